"""Tenant lifecycle and data protection: a removed tenant's data is quarantined or purged (a re-created id starts
empty), tenant data is owner-only on disk, /metrics is not open off loopback, /docs loads nothing from elsewhere."""

import re
import stat

import pytest

from tests.server.conftest import assert_error, auth, server_settings

SECRET = "The gamma vault combination is 4417-Orchid and only the old tenant knows it.\n"


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _upload(client, key, name, body=SECRET):
    response = client.post("/v1/documents", headers=auth(key), files=[("files", (name, body.encode(), "text/plain"))])
    assert response.status_code == 200, response.text
    assert response.json()["data"][0]["status"] in ("added", "updated"), response.text
    return response


def _retrieved_text(client, key) -> str:
    response = client.post("/v1/retrieve", json={"query": "vault combination Orchid"}, headers=auth(key))
    return response.text


def _new_tenant(client, corpus, tenant) -> str:
    created = client.post("/v1/admin/tenants", json={"id": tenant}, headers=auth(corpus.admin_key))
    assert created.status_code == 201, created.text
    return created.json()["api_key"]


def test_a_recreated_tenant_id_never_inherits_the_removed_tenants_data(client, corpus):
    key = _new_tenant(client, corpus, "omega")
    _upload(client, key, "vault.txt")
    assert "4417-Orchid" in _retrieved_text(client, key)

    removed = client.delete("/v1/admin/tenants/omega", headers=auth(corpus.admin_key))
    assert removed.status_code == 200, removed.text
    assert removed.json()["data"] == "quarantined"
    assert not (corpus.data_dir / "tenants" / "omega").exists()
    kept = list((corpus.data_dir / "quarantine").glob("omega-*/uploads/vault.txt"))
    assert len(kept) == 1 and kept[0].read_text() == SECRET  # out of reach, still there for the operator

    new_key = _new_tenant(client, corpus, "omega")
    assert "4417-Orchid" not in _retrieved_text(client, new_key)
    assert client.get("/v1/documents", headers=auth(new_key)).json()["data"] == []


def test_purge_deletes_the_data_and_also_clears_data_left_by_an_unregistered_tenant(client, corpus):
    key = _new_tenant(client, corpus, "sigma")
    _upload(client, key, "vault.txt")
    purged = client.delete("/v1/admin/tenants/sigma?purge=true", headers=auth(corpus.admin_key))
    assert purged.status_code == 200 and purged.json()["data"] == "purged", purged.text
    assert not (corpus.data_dir / "tenants" / "sigma").exists()
    assert not list((corpus.data_dir / "quarantine").glob("*sigma*"))

    leftover = corpus.data_dir / "tenants" / "tau" / "uploads"  # as an older lorag's `tenant remove` left it
    leftover.mkdir(parents=True)
    (leftover / "old.txt").write_text(SECRET)
    assert_error(client.delete("/v1/admin/tenants/tau", headers=auth(corpus.admin_key)), 404)
    cleared = client.delete("/v1/admin/tenants/tau?purge=true", headers=auth(corpus.admin_key))
    assert cleared.status_code == 200 and cleared.json()["data"] == "purged", cleared.text
    assert not (corpus.data_dir / "tenants" / "tau").exists()


def test_tenant_remove_cli_quarantines_or_purges(tmp_path, capsys):
    from lorag.cli import main
    from server.tenants import TenantRegistry

    data_dir = tmp_path / "data"
    registry = TenantRegistry(data_dir)
    for tenant in ("kappa", "lambda"):
        registry.add(tenant)
        (data_dir / "tenants" / tenant / "uploads").mkdir(parents=True)
        (data_dir / "tenants" / tenant / "uploads" / "a.txt").write_text(SECRET)
    assert main(["tenant", "remove", "kappa", "--data-dir", str(data_dir)]) == 0
    assert "moved to" in capsys.readouterr().out
    assert list((data_dir / "quarantine").glob("kappa-*/uploads/a.txt"))
    assert main(["tenant", "remove", "lambda", "--purge", "--data-dir", str(data_dir)]) == 0
    assert "deleted" in capsys.readouterr().out
    assert not (data_dir / "tenants" / "lambda").exists() and not list((data_dir / "quarantine").glob("lambda*"))
    assert [t.id for t in registry.tenants()] == []


def test_tenant_data_is_owner_only_after_ingest_upload_and_adapter_write(client, corpus):
    from adapters.manifest import write_adapter_dir
    from core.datadir import adapters_dir

    key = _new_tenant(client, corpus, "rho")
    _upload(client, key, "vault.txt")

    def fill(directory):
        (directory / "adapter_config.json").write_text('{"r": 4}')
        (directory / "adapter_model.safetensors").write_bytes(b"weights")
        (directory / "lorag_adapter.json").write_text("{}")

    write_adapter_dir(adapters_dir(corpus.data_dir, "rho") / "mine", fill)
    tenant = corpus.data_dir / "tenants" / "rho"
    directories = [corpus.data_dir / "tenants", tenant, tenant / "index", tenant / "uploads", tenant / "adapters",
                   tenant / "adapters" / "mine"]
    files = [tenant / "index" / "chunks.sqlite", *tenant.glob("index/vectors-*.faiss"), tenant / "uploads" / "vault.txt",
             tenant / "adapters" / "mine" / "adapter_model.safetensors"]
    assert len(files) == 4
    assert {str(d): oct(_mode(d)) for d in directories} == {str(d): "0o700" for d in directories}
    assert {str(f): oct(_mode(f)) for f in files} == {str(f): "0o600" for f in files}
    everything = [p for p in tenant.rglob("*") if not p.is_symlink()]
    assert [str(p) for p in everything if _mode(p) & 0o077] == []


@pytest.mark.parametrize("host, admin_key, status", [
    ("0.0.0.0", None, 403),  # reachable from other hosts, no key: refused
    ("127.0.0.1", None, 200),  # loopback development server: open
    ("0.0.0.0", "admin", 401),  # a key is set: it is needed
])
def test_metrics_are_not_open_off_loopback(corpus, extractive_generator, host, admin_key, status):
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.settings import ServerSettings

    server = {"host": host, "admin_key": corpus.admin_key if admin_key else None}
    app = create_app(ServerSettings(data_dir=corpus.data_dir, server=server),
                     retrieval=corpus.retrieval, generator=extractive_generator)
    with TestClient(app) as test_client:
        response = test_client.get("/metrics")
        assert response.status_code == status, response.text
        if status == 403:
            assert "server.admin_key" in response.json()["error"]["message"]
        if admin_key:
            assert test_client.get("/metrics", headers=auth(corpus.admin_key)).status_code == 200


def test_docs_page_loads_nothing_from_another_host(client):
    page = client.get("/docs")
    assert page.status_code == 200
    assert re.findall(r"(?:https?:)?//[\w.-]+", page.text) == []
    assets = re.findall(r"['\"](/docs/assets/[^'\"]+)['\"]", page.text)
    assert {a.rsplit("/", 1)[1] for a in assets} >= {"swagger-ui-bundle.js", "swagger-ui.css"}
    for asset in assets:
        assert client.get(asset).status_code == 200, asset
    assert client.get("/redoc").status_code == 404  # FastAPI's ReDoc page loads from a CDN: not served


def test_document_upload_quotas_count_and_bytes(corpus, extractive_generator):
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.settings import ServerSettings

    settings = ServerSettings(data_dir=corpus.data_dir, server={"admin_key": corpus.admin_key},
                              quotas={"max_uploads": 1, "max_upload_bytes": 2 * len(SECRET)})
    with TestClient(create_app(settings, retrieval=corpus.retrieval, generator=extractive_generator)) as client:
        key = _new_tenant(client, corpus, "upsilon")
        _upload(client, key, "vault.txt")
        _upload(client, key, "vault.txt", body=SECRET.replace("4417", "5518"))  # a replacement is no new document
        second = client.post("/v1/documents", headers=auth(key),
                             files=[("files", ("second.txt", SECRET.encode(), "text/plain"))])
        assert assert_error(second, 409)["code"] == "quota_exceeded"
        assert "quotas.max_uploads" in second.json()["error"]["message"]
        too_big = client.post("/v1/documents", headers=auth(key),
                              files=[("files", ("vault.txt", (SECRET * 3).encode(), "text/plain"))])
        assert assert_error(too_big, 413)["code"] == "quota_exceeded"
        assert "quotas.max_upload_bytes" in too_big.json()["error"]["message"]
        names = sorted(p.name for p in (corpus.data_dir / "tenants" / "upsilon" / "uploads").iterdir())
        assert names == ["vault.txt"]
