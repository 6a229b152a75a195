"""Tenant registry and the `lorag tenant` commands: keys stored as hashes, atomic file, format version."""

import json
import threading

import pytest

from core.errors import Conflict, LoragError, NotFound
from lorag.cli import main
from server.settings import HTTPSettings, ServerSettings
from server.tenants import FORMAT_VERSION, TenantRegistry, hash_key


def test_add_authenticate_rotate_remove(data_dir):
    registry = TenantRegistry(data_dir)
    tenant, key = registry.add("acme", default_adapter="support")
    assert tenant.id == "acme" and tenant.default_adapter == "support"
    assert registry.authenticate(key).id == "acme"
    assert registry.authenticate(key + "x") is None

    stored = json.loads((data_dir / "tenants.json").read_text())
    assert stored["format_version"] == FORMAT_VERSION
    assert key not in (data_dir / "tenants.json").read_text()  # only the hash is stored
    assert stored["tenants"][0]["key_hashes"] == [hash_key(key)]

    new_key = registry.rotate_key("acme")
    assert registry.authenticate(key) is None
    assert registry.authenticate(new_key).id == "acme"

    registry.remove("acme")
    assert registry.authenticate(new_key) is None
    assert registry.tenants() == []


def test_registry_refuses_bad_names_duplicates_and_unknown_tenants(data_dir):
    registry = TenantRegistry(data_dir)
    with pytest.raises(LoragError, match="invalid tenant name '../x'"):
        registry.add("../x")
    registry.add("acme")
    with pytest.raises(Conflict, match="'acme' already exists"):
        registry.add("acme")
    with pytest.raises(NotFound, match="'nope'"):
        registry.rotate_key("nope")
    with pytest.raises(NotFound, match="'nope'"):
        registry.remove("nope")


def test_registry_sees_edits_made_by_another_process(data_dir):
    server_view = TenantRegistry(data_dir)
    assert server_view.tenants() == []
    _, key = TenantRegistry(data_dir).add("late")  # e.g. `lorag tenant add` while serving
    assert server_view.authenticate(key).id == "late"


def test_registry_refuses_unknown_format_version(data_dir):
    (data_dir / "tenants.json").write_text(json.dumps({"format_version": 99, "tenants": []}))
    with pytest.raises(LoragError, match="format_version 99"):
        TenantRegistry(data_dir).tenants()


def test_tenant_cli_prints_key_once_and_lists_without_keys(data_dir, capsys):
    assert main(["tenant", "add", "acme", "--data-dir", str(data_dir)]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    assert TenantRegistry(data_dir).authenticate(key).id == "acme"

    assert main(["tenant", "list", "--data-dir", str(data_dir)]) == 0
    listing = capsys.readouterr().out
    assert "acme" in listing and key not in listing

    assert main(["tenant", "rotate-key", "acme", "--data-dir", str(data_dir)]) == 0
    new_key = capsys.readouterr().out.strip().splitlines()[-1]
    assert new_key != key and TenantRegistry(data_dir).authenticate(new_key).id == "acme"

    assert main(["tenant", "add", "acme", "--data-dir", str(data_dir)]) == Conflict.exit_code
    assert "already exists" in capsys.readouterr().err
    assert main(["tenant", "remove", "acme", "--data-dir", str(data_dir)]) == 0
    assert TenantRegistry(data_dir).tenants() == []


def test_tenant_cli_names_an_unusable_data_dir(tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    assert main(["tenant", "list", "--data-dir", str(a_file)]) == LoragError.exit_code
    assert "tenant registry" in capsys.readouterr().err
    assert main(["tenant", "add", "acme", "--data-dir", str(a_file / "sub")]) == LoragError.exit_code
    assert "cannot write the tenant registry" in capsys.readouterr().err


def test_serve_names_a_port_in_use_before_loading_anything(data_dir, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["serve", "--port", str(port), "--generator", "extractive", "--data-dir", str(data_dir)])
    assert code == LoragError.exit_code
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_unsafe_admin_key_refused_on_public_host():
    with pytest.raises(ValueError, match="unsafe for host '0.0.0.0'"):
        HTTPSettings(host="0.0.0.0", admin_key="changeme")
    with pytest.raises(ValueError, match="admin_key is empty"):
        HTTPSettings(admin_key="  ")
    assert HTTPSettings(host="127.0.0.1", admin_key="short").admin_hash() == hash_key("short")
    strong = "x" * 40
    assert HTTPSettings(host="0.0.0.0", admin_key=strong).admin_hash() == hash_key(strong)


def test_admin_key_from_environment(monkeypatch, data_dir):
    monkeypatch.setenv("LORAG_SERVER__ADMIN_KEY", "from-env")
    settings = ServerSettings(data_dir=data_dir)
    assert settings.server.admin_hash() == hash_key("from-env")
    assert "from-env" not in repr(settings)  # a SecretStr never prints


def test_concurrent_edits_are_serialised_by_the_file_lock(data_dir):
    names = [f"t{i}" for i in range(8)]
    keys = {}

    def add(name):
        keys[name] = TenantRegistry(data_dir).add(name)[1]  # one registry per "process"

    threads = [threading.Thread(target=add, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    registry = TenantRegistry(data_dir)
    assert [t.id for t in registry.tenants()] == sorted(names)  # no edit lost
    assert all(registry.authenticate(keys[name]).id == name for name in names)
    assert not list(data_dir.glob(".tenants.json.*.tmp"))


def test_serve_refuses_unsafe_admin_key_before_binding(data_dir, monkeypatch, capsys):
    monkeypatch.setenv("LORAG_SERVER__ADMIN_KEY", "changeme")
    assert main(["serve", "--host", "0.0.0.0", "--data-dir", str(data_dir)]) == LoragError.exit_code
    assert "unsafe for host '0.0.0.0'" in capsys.readouterr().err


def test_default_adapter_must_be_a_possible_adapter_name(data_dir):
    from adapters.registry import InvalidAdapter

    registry = TenantRegistry(data_dir)
    with pytest.raises(InvalidAdapter, match="invalid adapter name '../x'"):
        registry.add("gamma", default_adapter="../x")
    assert registry.tenants() == []  # nothing written
    tenant, _ = registry.add("delta", default_adapter="support-v1")
    assert tenant.default_adapter == "support-v1"
    with pytest.raises(InvalidAdapter):
        registry.set_default_adapter("delta", "a/b")


@pytest.mark.parametrize("content", ["[]", '{"format_version": 1, "tenants": [{"key_hashes": []}]}',
                                     '{"format_version": 1, "tenants": [5]}'])
def test_hand_edited_registry_is_a_clear_error(data_dir, content):
    (data_dir / "tenants.json").write_text(content)
    with pytest.raises(LoragError, match="tenant registry .*tenants.json"):
        TenantRegistry(data_dir).tenants()
