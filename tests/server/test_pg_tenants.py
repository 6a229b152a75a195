"""Tenants and API keys in PostgreSQL: the same contract as tenants.json, shared by every replica at once."""

import pytest

from core.errors import Conflict, LoragError, NotFound
from retrieval.pg.database import Database, shared_database
from server.pg_tenants import PgTenantRegistry
from server.tenants import TenantRegistry, hash_key, open_tenant_registry
from tests.server.conftest import ADMIN_KEY, auth


@pytest.fixture(params=["files", "postgresql"])
def registry(request, data_dir):
    if request.param == "files":
        return TenantRegistry(data_dir)
    return PgTenantRegistry(shared_database(request.getfixturevalue("postgres_dsn")))


def test_both_registries_keep_the_same_contract(registry):
    tenant, key = registry.add("acme", default_adapter="support")
    assert tenant.key_hashes == (hash_key(key),) and key not in str(tenant)
    assert registry.authenticate(key) == tenant == registry.get("acme")
    assert registry.authenticate(key + "x") is None and registry.authenticate("") is None
    with pytest.raises(Conflict, match="already exists"):
        registry.add("acme")
    with pytest.raises(LoragError, match="tenant"):
        registry.add("../escape")
    new = registry.rotate_key("acme")
    assert registry.authenticate(key) is None and registry.authenticate(new).id == "acme"
    assert registry.set_default_adapter("acme", None).default_adapter is None
    with pytest.raises(LoragError):
        registry.set_default_adapter("acme", "bad name/..")
    registry.add("beta")
    assert [t.id for t in registry.tenants()] == ["acme", "beta"]
    assert registry.remove("acme").id == "acme" and registry.authenticate(new) is None
    for call in (lambda: registry.get("acme"), lambda: registry.remove("acme"), lambda: registry.rotate_key("acme"),
                 lambda: registry.set_default_adapter("acme", None)):
        with pytest.raises(NotFound, match="'acme' does not exist"):
            call()


def test_settings_choose_the_registry(data_dir, postgres_dsn):
    from core.settings import Settings

    assert isinstance(open_tenant_registry(Settings(data_dir=data_dir)), TenantRegistry)
    chosen = open_tenant_registry(Settings(data_dir=data_dir, retrieval={"store": postgres_dsn}))
    assert isinstance(chosen, PgTenantRegistry)
    chosen.add("acme")
    assert not (data_dir / "tenants.json").exists()


def test_two_replicas_agree_on_tenants_without_restart(tmp_path, postgres_dsn, extractive_generator):
    """Two apps (two data dirs, their own pools) on one database: a tenant made on one works on the other."""
    from fastapi.testclient import TestClient

    from retrieval.service import RetrievalService
    from server.app import create_app
    from server.settings import ServerSettings

    clients, pools = [], []
    for name in ("one", "two"):
        settings = ServerSettings(data_dir=tmp_path / name, retrieval={"store": postgres_dsn},
                                  server={"admin_key": ADMIN_KEY})
        # Each replica its own pool, as two processes would have.
        app = create_app(settings, retrieval=RetrievalService(settings), generator=extractive_generator)
        pools.append(Database(postgres_dsn))
        app.state.services.registry = PgTenantRegistry(pools[-1])
        clients.append(TestClient(app))
    one, two = clients
    with one, two:
        created = one.post("/v1/admin/tenants", json={"id": "acme"}, headers=auth(ADMIN_KEY))
        assert created.status_code == 201, created.text
        key = created.json()["api_key"]
        assert two.get("/v1/documents", headers=auth(key)).status_code == 200
        rotated = two.post("/v1/admin/tenants/acme/rotate-key", headers=auth(ADMIN_KEY)).json()["api_key"]
        assert one.get("/v1/documents", headers=auth(key)).status_code == 401
        assert one.get("/v1/documents", headers=auth(rotated)).status_code == 200
        assert [t["id"] for t in one.get("/v1/admin/tenants", headers=auth(ADMIN_KEY)).json()["data"]] == ["acme"]
        assert two.delete("/v1/admin/tenants/acme", headers=auth(ADMIN_KEY)).status_code == 200
        assert one.get("/v1/documents", headers=auth(rotated)).status_code == 401
    for pool in pools:
        pool.close()


def test_both_registries_refuse_the_same_bad_import(registry):
    """import_tenant (lorag db copy-tenant) checks the tenant id and default adapter as add does, in either store."""
    from server.tenants import Tenant

    with pytest.raises(LoragError, match="tenant"):
        registry.import_tenant(Tenant("../escape", (hash_key("k"),), None, "2026-12-04T00:00:00+00:00"))
    with pytest.raises(LoragError):
        registry.import_tenant(Tenant("acme", (hash_key("k"),), "bad name/..", "2026-12-04T00:00:00+00:00"))
    assert registry.tenants() == []
