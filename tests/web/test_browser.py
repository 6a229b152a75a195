"""The web page in a real headless Chromium (Playwright) against a real lorag on uvicorn: sign in, streamed
answers, citations opened in the source panel, uploads that become citable, tenant isolation, adapters view.

Screenshots of each view go to $LORAG_TEST_ARTIFACTS/web (default: the test's tmp dir)."""

import os
import shutil
from pathlib import Path

import httpx
import pytest

from tests.web.conftest import auth, site_settings, write_pdf

pytestmark = pytest.mark.slow

CHROMIUM = Path(os.environ.get("LORAG_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
TIMEOUT_MS = 60_000  # the machine is shared; a slow answer is not a failure
PDF_QUESTION = "What is the accuracy of the dissolved oxygen sensor?"


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright Python package is not installed (pip install playwright)")
    if not CHROMIUM.exists() and shutil.which(str(CHROMIUM)) is None:
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set LORAG_CHROMIUM)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(site, extractive):
    from server.app import create_app
    from server.background import serving

    with serving(create_app(site_settings(site), retrieval=site.retrieval, generator=extractive)) as base_url:
        yield base_url


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 860}, base_url=server)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.goto("/")
    yield page
    context.close()


def sign_in(page, key):
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.locator("#view-chat").wait_for(state="visible")


def ask(page, question):
    page.get_by_label("Your question").fill(question)
    page.get_by_label("Your question").press("Enter")
    answer = page.locator(".assistant .answer").last
    page.wait_for_function(
        "() => { const a = [...document.querySelectorAll('.assistant .answer')].pop();"
        " return a && a.getAttribute('aria-busy') === 'false'; }"
    )
    return answer


def _panel_ids(page) -> list[str]:
    return page.locator(".passage").evaluate_all("nodes => nodes.map(n => n.dataset.passageId)")


def _neighbour_ids(server, key, passage_id, radius) -> list[str]:
    response = httpx.get(f"{server}/v1/passages/{passage_id}/neighbours",
                         params={"before": radius, "after": radius}, headers=auth(key))
    return [chunk["id"] for chunk in response.json()["data"]]


def test_wrong_key_is_rejected_with_a_message(page, artifacts):
    page.get_by_label("API key").fill("lorag-not-a-real-key")
    page.get_by_role("button", name="Sign in").click()
    error = page.locator("#signin-error")
    error.wait_for(state="visible")
    assert "not accepted" in error.inner_text() and "invalid API key" in error.inner_text()
    assert page.locator("#nav").is_hidden() and page.locator("#view-chat").is_hidden()
    assert page.evaluate("sessionStorage.length") == 0
    page.screenshot(path=artifacts / "signin-rejected.png")


def test_answer_citation_opens_passage_in_context(page, site, server, artifacts):
    sign_in(page, site.acme_key)
    assert page.evaluate("Object.values(sessionStorage)") == [site.acme_key]
    assert page.locator("#model").input_value() == "lorag"
    answer = ask(page, PDF_QUESTION)
    assert "0.1 mg/L" in answer.inner_text()
    assert "extractive fallback" in answer.locator(".notice").inner_text()

    cite = answer.locator("p button.cite", has_text="[").filter(
        has=page.locator("xpath=self::*[contains(@aria-label, 'kestrel-tide-datasheet.pdf, page 2')]")
    ).first
    cite.focus()
    page.keyboard.press("Enter")  # keyboard opens it, like a click
    panel = page.locator("#panel")
    panel.wait_for(state="visible")
    assert page.evaluate("document.activeElement.id") == "panel-title"
    page.locator(".passage.cited mark").first.wait_for()
    assert page.locator("#panel-page").inner_text() == "2"

    # The cited passage is exactly the stored chunk the answer cites, shown among its neighbours; inside it the
    # sentence the answer stands on is marked, not the whole chunk.
    passage_id = page.locator(".passage.cited").get_attribute("data-passage-id")
    stored = httpx.get(f"{server}/v1/passages/{passage_id}", headers=auth(site.acme_key)).json()["passage"]
    assert stored["page"] == 2 and "Dissolved oxygen" in stored["text"]
    assert page.locator(".passage.cited .text").text_content() == stored["text"]
    marked = " ".join(page.locator(".passage.cited mark").all_text_contents())
    assert "0.1 mg/L" in marked and len(marked) < len(stored["text"]) / 2
    assert _panel_ids(page) == _neighbour_ids(server, site.acme_key, passage_id, 1)
    page.get_by_role("button", name="Show more context").click()
    wider = _neighbour_ids(server, site.acme_key, passage_id, 3)
    page.wait_for_function(f"() => document.querySelectorAll('.passage').length === {len(wider)}")
    assert _panel_ids(page) == wider
    page.screenshot(path=artifacts / "chat-citation-panel.png")

    with page.context.expect_page() as opened:
        page.get_by_role("link", name="Open original PDF at page 2").click()
    original = opened.value
    original.wait_for_function("() => location.protocol === 'blob:'")
    assert original.url.endswith("#page=2")
    original.close()

    page.locator("#panel-title").focus()
    page.keyboard.press("Escape")
    panel.wait_for(state="hidden")
    assert page.evaluate("document.activeElement.classList.contains('cite')")

    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.screenshot(path=artifacts / "chat-phone.png", full_page=True)


def test_uploaded_pdf_becomes_citable_and_bad_file_is_reported(page, site, artifacts, tmp_path):
    pdf = write_pdf(tmp_path / "osprey-valve-manual.pdf", [
        ["Osprey valve manual", "Contents: installation, torque settings."],
        ["Torque settings", "The Osprey valve torque is 42 newton metres.", "Tighten the bonnet bolts crosswise."],
    ])
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.4 truncated garbage")
    sign_in(page, site.acme_key)
    page.get_by_role("button", name="Documents").click()
    page.locator("#documents-table tbody tr").first.wait_for()
    page.get_by_label("Add documents (PDF, Markdown, text, HTML)").set_input_files([pdf, broken])
    page.get_by_role("button", name="Upload").click()
    page.locator("#documents-status", has_text="Uploads finished").wait_for()
    good = page.locator('#upload-list li[data-file="osprey-valve-manual.pdf"]')
    assert "ok" in good.get_attribute("class") and "Added: 2 pages" in good.inner_text()
    assert good.locator("progress").get_attribute("value") == "100"
    bad = page.locator('#upload-list li[data-file="broken.pdf"]')
    assert "failed" in bad.get_attribute("class") and "Failed:" in bad.inner_text()
    row = page.locator("#documents-table tbody tr", has_text="osprey-valve-manual.pdf")
    assert row.locator("td").nth(0).inner_text() == "2"
    assert page.locator("#documents-table tbody tr", has_text="broken.pdf").count() == 0
    page.screenshot(path=artifacts / "documents.png", full_page=True)

    page.get_by_role("button", name="Chat").click()
    answer = ask(page, "What is the Osprey valve torque?")
    cite = answer.locator(".sources button.cite", has_text="osprey-valve-manual.pdf, page 2").first
    cite.click()
    assert "42 newton metres" in page.locator(".passage.cited mark").inner_text()
    page.get_by_role("button", name="Close source panel").click()

    page.get_by_role("button", name="Documents").click()
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Delete osprey-valve-manual.pdf").click()
    page.locator("#documents-status", has_text="Deleted osprey-valve-manual.pdf").wait_for()
    assert page.locator("#documents-table tbody tr", has_text="osprey-valve-manual.pdf").count() == 0
    assert page.locator("#documents-table tbody tr").count() == 2  # the two sample files stay


def test_other_tenant_sees_only_its_documents(page, site, server, artifacts):
    acme_docs = httpx.get(f"{server}/v1/documents", headers=auth(site.acme_key)).json()["data"]
    sign_in(page, site.beta_key)
    page.get_by_role("button", name="Documents").click()
    page.locator("#documents-table tbody tr").first.wait_for()
    names = page.locator("#documents-table tbody th").all_inner_texts()
    assert names == ["memo.txt"]
    # The file endpoint refuses acme's document ids to beta's key, from inside the page too.
    statuses = page.evaluate(
        """async (ids) => Promise.all(ids.map(async (id) => (await fetch(`/v1/documents/${id}/file`,
             {headers: {Authorization: `Bearer ${sessionStorage.getItem('lorag.apiKey')}`}})).status))""",
        [doc["id"] for doc in acme_docs],
    )
    assert statuses == [404] * len(acme_docs)
    page.screenshot(path=artifacts / "documents-other-tenant.png")


def test_adapters_view_reports_what_the_server_offers(page, site, server, artifacts):
    sign_in(page, site.acme_key)
    page.get_by_role("button", name="Adapters").click()
    status = page.locator("#adapters-status")
    page.wait_for_function("() => document.getElementById('adapters-status').textContent !== ''")
    listed = httpx.get(f"{server}/v1/adapters", headers=auth(site.acme_key))
    if listed.status_code == 404:  # a server without the adapter API says so instead of showing nothing
        assert status.inner_text() == "Adapter management is not available on this server."
    else:
        assert listed.json()["data"] == []  # acme has trained none
        assert status.inner_text() == "This tenant has no adapters yet (train one with lorag train)."
    page.screenshot(path=artifacts / "adapters.png")


def test_tiny_model_answer_streams_into_the_page(browser, site, tiny_llama_path, artifacts):
    from server.app import create_app
    from server.background import serving

    settings = site_settings(site)
    settings.generation.model = str(tiny_llama_path)
    settings.generation.fallback = "error"
    with serving(create_app(settings, retrieval=site.retrieval)) as base_url:
        context = browser.new_context(viewport={"width": 1280, "height": 860}, base_url=base_url)
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        page.goto("/")
        sign_in(page, site.acme_key)
        # Record what the answer shows while it is still streaming (aria-busy=true).
        page.evaluate("""() => {
            window.partials = [];
            new MutationObserver(() => {
                const a = [...document.querySelectorAll('.assistant .answer')].pop();
                if (a && a.getAttribute('aria-busy') === 'true') window.partials.push(a.textContent.length);
            }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
        }""")
        answer = ask(page, PDF_QUESTION)
        partials = [n for n in page.evaluate("window.partials") if n > 0]
        assert len(set(partials)) >= 2, partials  # text arrived in pieces, not all at once
        assert answer.inner_text().strip()
        assert answer.locator(".notice").count() == 0
        assert page.locator("#chat-error").inner_text() == ""
        page.screenshot(path=artifacts / "chat-tiny-model.png")
        context.close()


def test_adapters_view_renders_the_adapter_api_contract(page, site, artifacts):
    """The browser answers /v1/adapters with the agreed shape (no trained adapter or GPU here), so this checks
    the view's rendering and its load/unload calls; the real API is tested in tests/server."""
    import json

    adapters = [{
        "id": "support-v1", "name": "support-v1", "base_model": "Qwen/Qwen2.5-0.5B-Instruct", "method": "lora",
        "metrics": {"eval_loss": 1.23456, "steps": 120}, "residency": "disk", "pinned": False,
        "loss_plot_url": "/v1/adapters/support-v1/loss.png", "created_at": "2026-01-02T03:04:05+00:00",
    }]
    calls = []

    def adapters_api(route):
        request = route.request
        calls.append((request.method, request.url.split("/v1/")[1], request.headers.get("authorization")))
        if request.url.endswith("/v1/adapters"):
            body = json.dumps({"object": "list", "data": adapters})
            route.fulfill(status=200, content_type="application/json", body=body)
        elif request.url.endswith("/load"):
            adapters[0]["residency"] = "gpu"
            route.fulfill(status=200, content_type="application/json", body="{}")
        else:
            error = {"message": "no plot", "type": "not_found_error", "param": None, "code": None}
            route.fulfill(status=404, content_type="application/json", body=json.dumps({"error": error}))

    page.route("**/v1/adapters**", adapters_api)
    sign_in(page, site.acme_key)
    page.get_by_role("button", name="Adapters").click()
    row = page.locator("#adapters-table tbody tr", has_text="support-v1")
    row.wait_for()
    text = row.inner_text()
    assert "Qwen/Qwen2.5-0.5B-Instruct" in text and "lora" in text and "1.235" in text and "disk" in text
    row.get_by_text("not available").wait_for()
    row.get_by_role("button", name="Load support-v1").click()
    page.locator("#adapters-status", has_text="support-v1 loaded.").wait_for()
    page.get_by_role("button", name="Unload support-v1").wait_for()
    assert page.evaluate("document.activeElement.dataset.adapter") == "support-v1"  # focus survives the redraw
    assert ("POST", "adapters/support-v1/load", f"Bearer {site.acme_key}") in calls
    page.screenshot(path=artifacts / "adapters-contract.png")


def test_answer_shows_per_sentence_support_and_every_retrieved_passage(page, site, server, artifacts):
    sign_in(page, site.acme_key)
    answer = ask(page, PDF_QUESTION)
    assert answer.locator(".sentence.supported").count() >= 1
    assert "supported by the passages" in answer.locator(".support-summary").inner_text()
    retrieved = answer.locator("details.retrieved")
    retrieved.locator("summary").click()
    others = retrieved.locator("button.cite")
    assert others.count() >= 1  # retrieved but uncited passages stay one click away
    others.first.click()
    page.locator("#panel .passage.cited").wait_for()
    page.screenshot(path=artifacts / "chat-support.png")
    page.keyboard.press("Escape")

    declined = ask(page, "Who won the 1998 football world cup final?")
    assert declined.locator("p").first.inner_text().startswith("The documents do not say")
    assert "None of the retrieved passages answers" in declined.locator(".declined").first.inner_text()
    assert declined.locator("details.retrieved button.cite").count() >= 1


def test_an_unsupported_sentence_is_marked_on_the_page(page, site, artifacts):
    sign_in(page, site.acme_key)
    # The page's own renderer on the attribution object the server sends (a mixed answer, as a model may write).
    page.evaluate("""() => {
      const text = "Refunds take 30 days [1]. The buoy is painted green.";
      const citation = {number: 1, id: "x", source: "/srv/docs/returns.txt", page: 1, heading_path: [], text: "..."};
      const final = {citations: [citation], context: [], generator: "transformers:smollm2",
        attribution: {text, abstained: false, supported: 1, unsupported: 1, answerability: 0.8, sentences: [
          {start: 0, end: 25, text: "Refunds take 30 days.", supported: true, claim: true, citations: [1], score: 0.9},
          {start: 26, end: 52, text: "The buoy is painted green.", supported: false, claim: true, citations: [], score: 0.01}]}};
      const box = document.createElement("div");
      box.id = "probe";
      document.querySelector("#view-chat").append(box);
      renderAnswer(box, text, final);
    }""")
    probe = page.locator("#probe")
    assert probe.locator(".sentence.supported button.cite").inner_text() == "[1]"
    flagged = probe.locator(".sentence.unsupported")
    assert "The buoy is painted green." in flagged.inner_text() and "not in the documents" in flagged.inner_text()
    assert probe.locator(".support-summary.partial").inner_text() == "1 of 2 sentences supported by the passages."
    probe.screenshot(path=artifacts / "chat-unsupported-sentence.png")


def test_the_conversation_follows_the_newest_answer(page, site, artifacts):
    page.set_viewport_size({"width": 1000, "height": 640})
    sign_in(page, site.acme_key)
    for question in (PDF_QUESTION, "How long is the warranty?", "How do I return a product?"):
        ask(page, question)
        # The end of the newest answer, its sources included, is in view without scrolling by hand.
        assert page.evaluate("""() => { const log = document.getElementById('messages');
            return log.scrollHeight > log.clientHeight && log.scrollHeight - log.scrollTop - log.clientHeight < 24; }""")
        last = page.locator(".message.assistant").last.bounding_box()
        box = page.locator("#messages").bounding_box()
        assert last["y"] + last["height"] <= box["y"] + box["height"] + 1
    page.screenshot(path=artifacts / "chat-follows-newest.png")


def test_markdown_renders_in_answers_and_passages_without_raw_html(page, site, server, artifacts):
    guide = ("# Buoy care\n\nTo clean the **Osprey buoy** follow these steps:\n\n"
             "- rinse the hull with *fresh* water\n- check the `anchor-shackle` pin\n- dry the solar panel\n\n"
             "See [the maintenance site](https://example.org/care) for details. "
             "<img src=x onerror=\"window.__xss=1\"> <script>window.__xss=2</script>\n")
    upload = httpx.post(f"{server}/v1/documents", headers=auth(site.acme_key),
                        files={"files": ("buoy-care.md", guide.encode(), "text/markdown")}, timeout=120)
    assert upload.status_code == 200 and upload.json()["data"][0]["status"] == "added", upload.text

    sign_in(page, site.acme_key)
    # The page's renderer on an answer as a model writes it: Markdown with a marker, and HTML that must stay text.
    page.evaluate("""() => {
      const text = "To clean the buoy:\\n\\n1. Rinse the hull with **fresh water** [1].\\n2. Check the `anchor-shackle` pin.\\n\\n"
        + "Details: [care guide](https://example.org/care) and [bad](javascript:alert(1)) <img src=x onerror=\\"window.__xss=3\\">";
      const citation = {number: 1, id: "x", document_id: "d", source: "buoy-care.md", page: 1, heading_path: [], text: "...", sentences: []};
      const box = document.createElement("div");
      box.id = "probe";
      document.querySelector("#view-chat").append(box);
      renderAnswer(box, text, {citations: [citation], context: [], generator: "transformers:x", attribution: null});
    }""")
    probe = page.locator("#probe")
    body = probe.locator(".md")
    assert body.locator("ol > li").count() == 2
    assert body.locator("ol li strong").inner_text() == "fresh water"
    assert body.locator("ol li button.cite").inner_text() == "[1]"
    assert body.locator("code").inner_text() == "anchor-shackle"
    assert body.locator("a").count() == 1 and body.locator("a").get_attribute("href") == "https://example.org/care"
    assert probe.locator("img").count() == 0 and "<img src=x" in body.inner_text()
    probe.screenshot(path=artifacts / "chat-markdown-answer.png")

    answer = ask(page, "How do I clean the Osprey buoy hull?")
    cite = answer.locator("button.cite", has_text="buoy-care.md").first
    if not cite.count():  # the extractive answer may cite it only among the other retrieved passages
        answer.locator("details.retrieved summary").click()
        cite = answer.locator("details.retrieved button.cite", has_text="buoy-care.md").first
    cite.click()
    passage = page.locator("#panel .passage.cited .text")
    passage.wait_for()
    assert passage.locator("li").count() >= 3 and passage.locator("strong").first.inner_text() == "Osprey buoy"
    assert passage.locator("img, script").count() == 0
    page.screenshot(path=artifacts / "panel-markdown-passage.png")
    assert page.evaluate("window.__xss") is None


def test_the_cited_sentence_is_marked_not_the_whole_passage(page, site, artifacts):
    sign_in(page, site.acme_key)
    page.evaluate("""() => {
      const passage = "Returns. Products may be returned within 30 days of delivery. Refunds are paid to the original card "
        + "within five business days. Opened software cannot be returned.";
      const text = "Refunds reach the original card within five business days [1].";
      const citation = {number: 1, id: "c1", document_id: "d", source: "returns.txt", page: 1, heading_path: [],
        text: passage, sentences: [0]};
      const final = {citations: [citation], context: [], generator: "transformers:x", attribution: {text, abstained: false,
        supported: 1, unsupported: 0, answerability: 0.9, sentences: [{start: 0, end: text.length,
        text: "Refunds reach the original card within five business days.", supported: true, claim: true, citations: [1], score: 0.9}]}};
      const box = document.createElement("div");
      box.id = "probe";
      document.querySelector("#view-chat").append(box);
      renderAnswer(box, text, final);
    }""")

    def neighbours(route):
        import json

        text = ("Returns. Products may be returned within 30 days of delivery. Refunds are paid to the original card "
                "within five business days. Opened software cannot be returned.")
        chunk = {"id": "c1", "document_id": "d", "source": "returns.txt", "page": 1, "start": 0, "end": len(text),
                 "heading_path": [], "text": text, "url": "/v1/passages/c1"}
        route.fulfill(status=200, content_type="application/json", body=json.dumps({"object": "list", "data": [chunk]}))

    page.route("**/v1/passages/c1/neighbours**", neighbours)
    for trigger in (page.locator("#probe .sentence button.cite"), page.locator("#probe .sources button.cite")):
        trigger.click()
        page.locator("#panel .passage.cited mark").wait_for()
        assert page.locator("#panel .passage.cited mark").all_text_contents() == [
            "Refunds are paid to the original card within five business days."]
        page.screenshot(path=artifacts / "panel-cited-sentence.png")
        page.keyboard.press("Escape")
        page.locator("#panel").wait_for(state="hidden")


def test_adapters_view_is_a_readable_table(page, site, artifacts):
    import json

    adapters = [
        {"id": "support-v2", "name": "support-v2", "base_model": "Qwen/Qwen2.5-0.5B-Instruct", "method": "lora",
         "rank": 16, "default": True, "residency": "gpu", "pinned": True, "loss_plot_url": None,
         "created_at": "2026-02-03T04:05:06+00:00",
         "metrics": {"steps": 300, "val_loss": 0.912345, "val_perplexity": 2.49012, "base_val_perplexity": 9.87654,
                     "tokens_per_second": 1234.5}},
        {"id": "support-v1", "name": "support-v1", "base_model": "Qwen/Qwen2.5-0.5B-Instruct", "method": "dora",
         "rank": 8, "residency": "disk", "pinned": False, "loss_plot_url": None,
         "created_at": "2026-01-02T03:04:05+00:00", "metrics": {"steps": 120}},
    ]
    page.route("**/v1/adapters", lambda route: route.fulfill(
        status=200, content_type="application/json", body=json.dumps({"object": "list", "data": adapters})))
    sign_in(page, site.acme_key)
    page.get_by_role("button", name="Adapters").click()
    table = page.locator("#adapters-table")
    table.locator("tbody tr").nth(1).wait_for()
    headers = table.locator("thead th").all_inner_texts()
    assert headers[:8] == ["Adapter", "Base model", "Method", "Validation", "Steps", "Where", "Created", "Training loss"]
    first = table.locator("tbody tr").nth(0).locator("th, td").all_inner_texts()
    assert first[:8] == ["support-v2 (default)", "Qwen/Qwen2.5-0.5B-Instruct", "lora, rank 16",
                         "loss 0.9123, perplexity 2.49 (base 9.877)", "300", "accelerator (pinned)", "2026-02-03", "none"]
    second = table.locator("tbody tr").nth(1).locator("th, td").all_inner_texts()
    assert second[3] == "not measured" and second[5] == "disk"
    # Every column, the action included, fits the page without scrolling the table sideways.
    assert page.evaluate("(() => { const w = document.querySelector('#adapters-wrap'); return w.scrollWidth <= w.clientWidth; })()")
    assert "{" not in table.inner_text()  # no raw JSON dumps
    assert table.get_by_role("button", name="Unload support-v2").is_disabled()  # pinned and resident
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.screenshot(path=artifacts / "adapters-table.png", full_page=True)
