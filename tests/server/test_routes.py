"""Retrieval, passages, documents, models, admin and health routes through the real app factory,
with tenant isolation on every tenant-scoped endpoint."""

import pytest

from tests.server.conftest import BETA_TEXT, assert_error, auth

PDF_SOURCE = "kestrel-tide-datasheet.pdf"


def _retrieve(client, key, query, **extra):
    response = client.post("/v1/retrieve", json={"query": query, **extra}, headers=auth(key))
    assert response.status_code == 200, response.text
    return response.json()["data"]


def _pdf_passage(client, key, query="dissolved oxygen sensor accuracy"):
    hits = _retrieve(client, key, query, k=10)
    return next(hit for hit in hits if hit["source"].endswith(PDF_SOURCE))


def test_retrieve_finds_the_pdf_page(client, corpus):
    hit = _pdf_passage(client, corpus.acme_key)
    assert hit["page"] == 2  # the sample README: DO accuracy is on page 2 of the datasheet
    assert "0.1 mg/L" in hit["text"]
    assert hit["end"] > hit["start"] >= 0
    assert hit["url"] == f"/v1/passages/{hit['id']}"


def test_retrieve_filters_by_source_and_mode(client, corpus):
    pdf = _pdf_passage(client, corpus.acme_key)
    hits = _retrieve(client, corpus.acme_key, "battery", k=5, sources=[pdf["source"]], mode="keyword")
    assert hits and {hit["source"] for hit in hits} == {pdf["source"]}


def test_retrieve_limits(client, corpus):
    response = client.post("/v1/retrieve", json={"query": "x", "k": 1000}, headers=auth(corpus.acme_key))
    assert_error(response, 400, param="k")
    response = client.post("/v1/retrieve", json={"query": "", "k": 1}, headers=auth(corpus.acme_key))
    assert_error(response, 400, error_type="invalid_request_error", param="query")


def test_passage_with_neighbours_and_documents(client, corpus):
    hit = _pdf_passage(client, corpus.acme_key)
    response = client.get(f"/v1/passages/{hit['id']}", params={"neighbours": 1}, headers=auth(corpus.acme_key))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["passage"]["id"] == hit["id"] and body["passage"]["text"] == hit["text"]
    assert body["neighbours"], "a 4-page PDF chunk has at least one neighbour"
    assert all(n["document_id"] == hit["document_id"] for n in body["neighbours"])

    response = client.get(f"/v1/passages/{hit['id']}/neighbours", params={"before": 1, "after": 1},
                          headers=auth(corpus.acme_key))
    ids = [p["id"] for p in response.json()["data"]]
    assert hit["id"] in ids

    documents = client.get("/v1/documents", headers=auth(corpus.acme_key)).json()["data"]
    pdf_doc = next(d for d in documents if d["id"] == hit["document_id"])
    assert pdf_doc["pages"] == 4 and pdf_doc["source"].endswith(PDF_SOURCE)
    detail = client.get(f"/v1/documents/{pdf_doc['id']}", headers=auth(corpus.acme_key)).json()
    assert len(detail["chunks"]) == pdf_doc["chunk_count"]
    assert hit["id"] in [c["id"] for c in detail["chunks"]]
    assert [c["page"] for c in detail["chunks"]] == sorted(c["page"] for c in detail["chunks"])


def test_unknown_passage_and_document_are_404(client, corpus):
    assert_error(client.get("/v1/passages/nope", headers=auth(corpus.acme_key)), 404)
    assert_error(client.get("/v1/passages/nope/neighbours", headers=auth(corpus.acme_key)), 404)
    assert_error(client.get("/v1/documents/nope", headers=auth(corpus.acme_key)), 404)


@pytest.mark.parametrize(
    "path",
    ["/v1/passages/{chunk}", "/v1/passages/{chunk}?neighbours=2", "/v1/passages/{chunk}/neighbours",
     "/v1/documents/{document}"],
)
def test_isolation_other_tenants_ids_are_404(client, corpus, path):
    hit = _pdf_passage(client, corpus.acme_key)
    url = path.format(chunk=hit["id"], document=hit["document_id"])
    error = assert_error(client.get(url, headers=auth(corpus.beta_key)), 404)
    assert hit["text"] not in str(error)
    assert client.get(url, headers=auth(corpus.acme_key)).status_code == 200


def test_isolation_retrieve_and_documents_only_show_own_data(client, corpus):
    beta_hits = _retrieve(client, corpus.beta_key, "Kestrel Tide dissolved oxygen warranty", k=10)
    assert beta_hits and all(hit["text"] in BETA_TEXT for hit in beta_hits)
    acme_hits = _retrieve(client, corpus.acme_key, "beta launch code Heron", k=10)
    assert all("7741" not in hit["text"] for hit in acme_hits)
    beta_docs = client.get("/v1/documents", headers=auth(corpus.beta_key)).json()["data"]
    assert [d["source"].rsplit("/", 1)[-1] for d in beta_docs] == ["memo.txt"]


def test_isolation_a_tenant_key_cannot_name_another_tenant(client, corpus):
    headers = auth(corpus.beta_key, **{"X-Lorag-Tenant": "acme"})
    assert_error(client.get("/v1/documents", headers=headers), 403, error_type="permission_error")


def test_admin_acts_as_a_named_tenant_only(client, corpus):
    assert_error(client.get("/v1/documents", headers=auth(corpus.admin_key)), 403)
    as_beta = client.get("/v1/documents", headers=auth(corpus.admin_key, **{"X-Lorag-Tenant": "beta"}))
    assert [d["source"].rsplit("/", 1)[-1] for d in as_beta.json()["data"]] == ["memo.txt"]
    assert_error(client.get("/v1/documents", headers=auth(corpus.admin_key, **{"X-Lorag-Tenant": "ghost"})), 404)


def test_admin_tenant_endpoints(client, corpus):
    assert_error(client.get("/v1/admin/tenants", headers=auth(corpus.acme_key)), 403)
    created = client.post("/v1/admin/tenants", json={"id": "gamma"}, headers=auth(corpus.admin_key))
    assert created.status_code == 201, created.text
    key = created.json()["api_key"]
    assert client.get("/v1/documents", headers=auth(key)).json()["data"] == []  # no index yet, no one else's
    listed = client.get("/v1/admin/tenants", headers=auth(corpus.admin_key)).json()["data"]
    assert {"acme", "beta", "gamma"} <= {t["id"] for t in listed}
    assert_error(client.post("/v1/admin/tenants", json={"id": "gamma"}, headers=auth(corpus.admin_key)), 409)

    rotated = client.post("/v1/admin/tenants/gamma/rotate-key", headers=auth(corpus.admin_key)).json()["api_key"]
    assert_error(client.get("/v1/documents", headers=auth(key)), 401)
    assert client.get("/v1/documents", headers=auth(rotated)).status_code == 200
    assert client.delete("/v1/admin/tenants/gamma", headers=auth(corpus.admin_key)).status_code == 200
    assert_error(client.get("/v1/documents", headers=auth(rotated)), 401, error_type="authentication_error")


def test_models_lists_base_aliases_and_own_adapters(client, corpus):
    adapter_dir = corpus.data_dir / "tenants" / "acme" / "adapters" / "support-v1"
    adapter_dir.mkdir(parents=True, exist_ok=True)
    (adapter_dir / "lorag_adapter.json").write_text("{}")
    acme = client.get("/v1/models", headers=auth(corpus.acme_key)).json()
    assert acme["object"] == "list"
    ids = {m["id"] for m in acme["data"]}
    assert {"lorag", "base", "support-v1"} <= ids
    beta_ids = {m["id"] for m in client.get("/v1/models", headers=auth(corpus.beta_key)).json()["data"]}
    assert "support-v1" not in beta_ids
    assert client.get("/v1/models/support-v1", headers=auth(corpus.acme_key)).json()["kind"] == "adapter"
    error = assert_error(client.get("/v1/models/support-v1", headers=auth(corpus.beta_key)), 404)
    assert error["code"] == "model_not_found"


def test_health_ready_and_metrics(client, corpus):
    assert client.get("/healthz").json()["status"] == "ok"
    ready = client.get("/readyz").json()
    assert ready == {"status": "ok", "generator": "extractive", "generator_kind": "extractive", "retrieval": True}
    _retrieve(client, corpus.acme_key, "warranty")
    # Tenant ids and adapter names are in the labels: with an admin key set, only it reads them.
    assert_error(client.get("/metrics"), 401)
    assert_error(client.get("/metrics", headers=auth(corpus.acme_key)), 403)
    text = client.get("/metrics", headers=auth(corpus.admin_key)).text
    assert 'lorag_http_requests_total{method="POST",route="/v1/retrieve",status="200",tenant="acme"}' in text
    assert 'lorag_retrieval_seconds_count{tenant="acme"}' in text


def test_auth_errors(client, corpus):
    error = assert_error(client.get("/v1/models"), 401, error_type="authentication_error")
    assert "Bearer" in error["message"]
    assert_error(client.get("/v1/models", headers=auth("lorag-wrong")), 401)
    assert_error(client.get("/v1/no-such-route", headers=auth(corpus.acme_key)), 404)
    assert_error(client.delete("/v1/models", headers=auth(corpus.acme_key)), 405)


def test_openapi_documents_every_route(client):
    schema = client.get("/openapi.json").json()
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    assert chat["tags"] == ["chat"]
    assert chat["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatResponse")
    assert "404" in chat["responses"] and "503" in chat["responses"]
    assert "examples" in schema["components"]["schemas"]["ChatRequest"]


def test_unexpected_errors_are_500_without_internals(corpus, extractive_generator):
    from fastapi.testclient import TestClient

    from server.app import create_app
    from tests.server.conftest import server_settings

    app = create_app(server_settings(corpus), retrieval=corpus.retrieval, generator=extractive_generator)

    def broken():
        raise RuntimeError("secret internal detail /etc/lorag")

    app.add_api_route("/v1/broken", broken)  # a route with a bug, to exercise the last-resort handler
    with TestClient(app, raise_server_exceptions=False) as test_client:
        error = assert_error(test_client.get("/v1/broken"), 500, error_type="server_error")
    assert "secret" not in error["message"] and "RuntimeError" not in error["message"]


def test_default_adapter_alias_resolves_per_tenant(corpus):
    from server.catalog import ModelCatalog
    from server.errors import ModelNotFound
    from server.tenants import Tenant

    catalog = ModelCatalog(corpus.data_dir, base_name="base-model")
    adapter_dir = corpus.data_dir / "tenants" / "beta" / "adapters" / "memo-style"
    adapter_dir.mkdir(parents=True, exist_ok=True)
    (adapter_dir / "lorag_adapter.json").write_text("{}")
    assert catalog.resolve("lorag", Tenant("beta", default_adapter="memo-style")).adapter == "memo-style"
    assert catalog.resolve("lorag", Tenant("beta", default_adapter="gone")).adapter is None
    assert catalog.resolve("base-model", Tenant("beta", default_adapter="memo-style")).adapter is None
    with pytest.raises(ModelNotFound, match="'memo-style' does not exist"):
        catalog.resolve("memo-style", Tenant("acme"))  # another tenant's adapter is not visible


def test_adapter_upload_is_refused_before_its_archive_is_unpacked(client, corpus):
    garbage = {"file": ("adapter.zip", b"not a zip at all", "application/zip")}
    # The name is checked first: a garbage archive would otherwise be reported as unreadable.
    error = assert_error(
        client.post("/v1/adapters", data={"name": "../x"}, files=garbage, headers=auth(corpus.acme_key)), 422
    )
    assert "invalid adapter name '../x'" in error["message"]
    # The extractive generator serves no adapters: refused without unpacking anything.
    error = assert_error(
        client.post("/v1/adapters", data={"name": "ok"}, files=garbage, headers=auth(corpus.acme_key)), 409
    )
    assert "cannot serve adapters" in error["message"]


def test_adapter_registration_body_names_the_missing_field(client, corpus):
    error = assert_error(client.post("/v1/adapters", json={"name": "x1"}, headers=auth(corpus.acme_key)), 400)
    assert error["param"] == "path" and "Field required" in error["message"]
    assert "errors.pydantic.dev" not in error["message"]
