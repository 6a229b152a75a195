"""Upload, original-file and delete endpoints through the real app (TestClient): per-file outcomes, bad
uploads, tenant isolation; and the page's own routes."""

import pytest

from tests.conftest import SAMPLE_DOCS
from tests.web.conftest import auth, site_settings, write_pdf

PDF_FACT = "The Osprey valve torque is 42 newton metres."


@pytest.fixture(scope="module")
def client(site, extractive):
    from fastapi.testclient import TestClient

    from server.app import create_app

    app = create_app(site_settings(site), retrieval=site.retrieval, generator=extractive)
    with TestClient(app) as test_client:
        yield test_client


def _error(response, status: int) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error["message"]


def _sources(client, key) -> list[str]:
    response = client.get("/v1/documents", headers=auth(key))
    assert response.status_code == 200, response.text
    return [doc["source"] for doc in response.json()["data"]]


def test_mixed_batch_gets_one_outcome_per_file_and_good_files_are_searchable(client, site, tmp_path):
    pdf = write_pdf(tmp_path / "valve.pdf", [["Osprey valve manual"], ["Maintenance", PDF_FACT]])
    files = [
        ("files", ("../../Osprey Valve.pdf", pdf.read_bytes(), "application/pdf")),
        ("files", ("notes.md", b"# Notes\n\nThe heron mascot is called Pip.\n", "text/markdown")),
        ("files", ("broken.pdf", b"this is not a pdf at all", "application/pdf")),
        ("files", ("tool.exe", b"MZ\x90\x00", "application/octet-stream")),
        ("files", ("empty.txt", b"", "text/plain")),
        ("files", ("notes.md", b"# Other\n\nA second file with the same name.\n", "text/markdown")),
    ]
    response = client.post("/v1/documents", headers=auth(site.acme_key), files=files)
    assert response.status_code == 200, response.text
    outcomes = response.json()["data"]
    assert [o["status"] for o in outcomes] == ["added", "added", "failed", "rejected", "rejected", "rejected"]
    valve, notes, broken, exe, empty, twice = outcomes
    assert valve["saved_as"] == "Osprey_Valve.pdf" and valve["pages"] == 2 and valve["chunks"] >= 1
    assert notes["saved_as"] == "notes.md" and notes["document_id"]
    assert broken["reason"]
    assert ".exe" in exe["reason"]
    assert "empty" in empty["reason"]
    assert "twice" in twice["reason"]

    uploads = site.data_dir / "tenants" / "acme" / "uploads"
    assert sorted(p.name for p in uploads.iterdir()) == ["Osprey_Valve.pdf", "notes.md"]  # nothing else left behind
    # Clients see the document's name; the path on the server never leaves it.
    assert "Osprey_Valve.pdf" in _sources(client, site.acme_key)
    assert not any(str(site.data_dir) in source for source in _sources(client, site.acme_key))

    found = client.post("/v1/retrieve", headers=auth(site.acme_key), json={"query": "Osprey valve torque", "k": 3})
    top = found.json()["data"][0]
    assert top["source"].endswith("Osprey_Valve.pdf") and top["page"] == 2 and "42 newton metres" in top["text"]
    # The other tenant's search does not see it.
    other = client.post("/v1/retrieve", headers=auth(site.beta_key), json={"query": "Osprey valve torque", "k": 3})
    assert all("Osprey" not in p["source"] for p in other.json()["data"])


def test_original_file_is_served_to_its_tenant_only(client, site):
    docs = client.get("/v1/documents", headers=auth(site.acme_key)).json()["data"]
    pdf = next(d for d in docs if d["source"].endswith("kestrel-tide-datasheet.pdf"))
    response = client.get(f"/v1/documents/{pdf['id']}/file", headers=auth(site.acme_key))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/pdf"
    assert response.content == (SAMPLE_DOCS / "specs" / "kestrel-tide-datasheet.pdf").read_bytes()
    assert response.headers["content-disposition"].startswith("inline")

    text = next(d for d in docs if d["source"].endswith(".txt"))
    response = client.get(f"/v1/documents/{text['id']}/file", headers=auth(site.acme_key))
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.headers["x-content-type-options"] == "nosniff"

    assert "acme" not in _error(client.get(f"/v1/documents/{pdf['id']}/file", headers=auth(site.beta_key)), 404)
    _error(client.get(f"/v1/documents/{pdf['id']}/file"), 401)
    _error(client.get("/v1/documents/not-a-document/file", headers=auth(site.acme_key)), 404)


def test_html_original_is_sandboxed(client, site):
    page = b"<html><body><h1>Dock rules</h1><p>Boats dock at pier 9.</p><script>alert(1)</script></body></html>"
    files = [("files", ("dock.html", page, "text/html"))]
    response = client.post("/v1/documents", headers=auth(site.acme_key), files=files)
    outcome = response.json()["data"][0]
    assert outcome["status"] == "added", outcome
    served = client.get(f"/v1/documents/{outcome['document_id']}/file", headers=auth(site.acme_key))
    assert served.content == page
    assert served.headers["content-security-policy"] == "sandbox"


def test_reupload_replaces_or_keeps_the_document(client, site):
    first = b"Ferry timetable.\n\nThe first ferry leaves at 06:10.\n"
    post = lambda body: client.post(  # noqa: E731
        "/v1/documents", headers=auth(site.acme_key), files=[("files", ("ferry.txt", body, "text/plain"))]
    ).json()["data"][0]
    added = post(first)
    assert added["status"] == "added"
    assert post(first)["status"] == "unchanged"
    updated = post(b"Ferry timetable.\n\nThe first ferry now leaves at 05:40.\n")
    assert updated["status"] == "updated" and updated["document_id"] != added["document_id"]
    ferry = [s for s in _sources(client, site.acme_key) if s.endswith("ferry.txt")]
    assert len(ferry) == 1
    # A failing re-upload of the same name keeps the previous file and document.
    failed = client.post(
        "/v1/documents", headers=auth(site.acme_key), files=[("files", ("ferry.txt", b"\x00\xff" * 50, "text/plain"))]
    ).json()["data"][0]
    assert failed["status"] == "failed", failed
    kept = client.get(f"/v1/documents/{updated['document_id']}/file", headers=auth(site.acme_key))
    assert b"05:40" in kept.content


def test_delete_removes_document_and_upload_for_its_tenant_only(client, site):
    body = b"Lighthouse log.\n\nThe lamp was replaced on 3 March.\n"
    outcome = client.post(
        "/v1/documents", headers=auth(site.acme_key), files=[("files", ("lighthouse.txt", body, "text/plain"))]
    ).json()["data"][0]
    doc_id = outcome["document_id"]
    saved = site.data_dir / "tenants" / "acme" / "uploads" / "lighthouse.txt"
    assert saved.is_file()

    _error(client.delete(f"/v1/documents/{doc_id}", headers=auth(site.beta_key)), 404)
    assert saved.is_file()

    response = client.delete(f"/v1/documents/{doc_id}", headers=auth(site.acme_key))
    assert response.status_code == 200, response.text
    assert response.json() == {
        "id": doc_id, "object": "document.deleted", "deleted": True, "source": "lighthouse.txt", "upload_removed": True
    }
    assert not saved.exists()
    assert "lighthouse.txt" not in _sources(client, site.acme_key)
    _error(client.get(f"/v1/documents/{doc_id}/file", headers=auth(site.acme_key)), 404)
    _error(client.delete(f"/v1/documents/{doc_id}", headers=auth(site.acme_key)), 404)


def test_bad_upload_requests(client, site):
    assert "files" in _error(client.post("/v1/documents", headers=auth(site.acme_key)), 400)
    many = [("files", (f"f{i}.txt", b"x", "text/plain")) for i in range(21)]
    assert "21 files" in _error(client.post("/v1/documents", headers=auth(site.acme_key), files=many), 400)
    _error(client.post("/v1/documents", files=[("files", ("a.txt", b"hello", "text/plain"))]), 401)


def test_size_limits(site, extractive):
    from fastapi.testclient import TestClient

    from ingest.settings import IngestSettings
    from server.app import create_app
    from server.settings import ServerSettings

    class LimitedSettings(ServerSettings):
        ingest: IngestSettings = IngestSettings(max_file_bytes=100)

    settings = LimitedSettings(data_dir=site.data_dir, server={"max_body_bytes": 4096})
    with TestClient(create_app(settings, retrieval=site.retrieval, generator=extractive)) as limited:
        files = [("files", ("big.txt", b"y" * 200, "text/plain")), ("files", ("small.txt", b"tiny tern", "text/plain"))]
        outcomes = limited.post("/v1/documents", headers=auth(site.beta_key), files=files).json()["data"]
        assert outcomes[0]["status"] == "rejected" and "100 bytes" in outcomes[0]["reason"]
        assert outcomes[1]["status"] == "added"
        huge = [("files", ("huge.txt", b"z" * 5000, "text/plain"))]
        assert "4096" in _error(limited.post("/v1/documents", headers=auth(site.beta_key), files=huge), 413)


@pytest.mark.parametrize(
    ("given", "saved"),
    [("../../etc/passwd.txt", "passwd.txt"), ("C:\\Users\\a\\Report 2024.PDF", "Report_2024.pdf"),
     ("résumé notes.md", "resume_notes.md"), ("a?b*c.html", "a_b_c.html")],
)
def test_sanitize_filename(given, saved):
    from server.uploads import sanitize_filename

    assert sanitize_filename(given) == saved


@pytest.mark.parametrize("given", ["", ".txt", "noext", "archive.zip", "..", "/"])
def test_sanitize_filename_refuses(given):
    from core.errors import LoragError
    from server.uploads import sanitize_filename

    with pytest.raises(LoragError, match="upload"):
        sanitize_filename(given)


def test_page_and_assets(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert '<script src="/web/app.js"' in page.text and "http" not in page.text.replace("http-equiv", "")
    script = client.get("/web/app.js")
    assert script.headers["content-type"].startswith("text/javascript") and "/v1/chat/completions" in script.text
    assert client.get("/web/style.css").headers["content-type"].startswith("text/css")
    _error(client.get("/web/index.html"), 404)
    _error(client.get("/web/..%2Fapp.py"), 404)
    assert "/" not in client.get("/openapi.json").json()["paths"]
