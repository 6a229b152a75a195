"""Hostile adapter uploads against a real uvicorn server with the tiny Llama: every one is a clean 4xx naming the
problem, the keep-alive connection survives, nothing but adapter files is stored, sizes are checked against the
safetensors header before a byte is written, NaN weights are refused at registration, per-tenant quotas hold."""

import json
import os
import shutil
import subprocess
import threading

import httpx
import pytest

from tests.adapters.test_serving import ADMIN_KEY, adapter_server, tar_of

pytestmark = pytest.mark.slow

GIB = 2**30


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama_path, retrieval_service):
    data_dir = tmp_path_factory.mktemp("hardening-data")
    with adapter_server(data_dir, tiny_llama_path, retrieval_service, poll_interval_s=0) as (url, keys, _):
        yield url, keys, data_dir


def upload(client: httpx.Client, key: str, name: str, archive: bytes, filename="adapter.tar.gz") -> httpx.Response:
    return client.post("/v1/adapters", headers={"Authorization": f"Bearer {key}"}, data={"name": name},
                       files={"file": (filename, archive, "application/gzip")})


def with_config(source, tmp_path, raw: bytes):
    target = shutil.copytree(source, tmp_path / "hostile")
    (target / "lorag_adapter.json").unlink()  # a plain peft dir: the config is all the server reads
    (target / "adapter_config.json").write_bytes(raw)
    return target


def client_port(response: httpx.Response) -> int:
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


def test_deeply_nested_config_is_a_clean_422_and_the_keep_alive_connection_survives(server, adapter_sources, tmp_path):
    url, keys, _ = server
    deep = b'{"r": 4, "x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    archive = tar_of(with_config(adapter_sources["alpha"], tmp_path, deep))
    with httpx.Client(base_url=url, timeout=60) as client:
        refused = upload(client, keys["acme"], "deep", archive)
        assert refused.status_code == 422, refused.text
        assert "nested" in refused.json()["error"]["message"]
        again = client.get("/v1/adapters", headers={"Authorization": f"Bearer {keys['acme']}"})
        assert again.status_code == 200
        assert client_port(again) == client_port(refused)  # the same connection answered both


def _hostile_configs(good: dict) -> list[tuple[str, bytes, str]]:
    wrong = {  # a wrong type for every field the server reads
        "r": "4", "lora_alpha": "sixteen", "lora_dropout": [0.1], "target_modules": 7, "modules_to_save": "lm_head",
        "layers_to_transform": "all", "rank_pattern": [4], "alpha_pattern": {"q_proj": "x"}, "use_dora": "yes",
        "use_rslora": 1, "fan_in_fan_out": None, "inference_mode": "true", "bias": 0,
        "base_model_name_or_path": 12, "task_type": [], "peft_type": {"LORA": 1},
    }
    cases = [(f"wrong type {field}", json.dumps(good | {field: value}).encode(), f"field '{field}'")
             for field, value in wrong.items()]
    return cases + [
        ("huge float", json.dumps(good).replace('"lora_alpha": ', '"lora_alpha": 1e999999, "x": ').encode(),
         "lora_alpha"),
        ("huge integer", json.dumps(good | {"r": 10**300}).encode(), "max_rank"),
        ("integer too long to parse", b'{"r": ' + b"9" * 50_000 + b"}", "not valid JSON"),
        ("NaN literal", json.dumps(good).replace('"lora_alpha": ', '"lora_alpha": NaN, "x": ').encode(),
         "not valid JSON"),
        ("duplicate keys", b'{"r": 4, "r": 64, ' + json.dumps(good)[1:].replace('"r": 4,', '').encode(),
         "key 'r' twice"),
        ("non-UTF-8", json.dumps(good).encode().replace(b'"lora"', b'"l\xffra"', 1) + b' "\xfe"', "not UTF-8"),
        ("not an object", b"[1, 2, 3]", "JSON object"),
        ("deep nesting", b"{" * 5000 + b"}" * 5000, "nested"),
    ]


def test_hostile_configs_are_all_clean_422s_naming_the_problem(server, adapter_sources, tmp_path):
    url, keys, _ = server
    good = json.loads((adapter_sources["alpha"] / "adapter_config.json").read_text())
    with httpx.Client(base_url=url, timeout=60) as client:
        for number, (case, raw, expected) in enumerate(_hostile_configs(good)):
            archive = tar_of(with_config(adapter_sources["alpha"], tmp_path / str(number), raw))
            response = upload(client, keys["acme"], f"hostile{number}", archive)
            assert response.status_code in (409, 422), (case, response.text)
            message = response.json()["error"]["message"]
            assert expected in message, (case, message)
            assert str(tmp_path) not in message
        listed = client.get("/v1/adapters", headers={"Authorization": f"Bearer {keys['acme']}"}).json()["data"]
        assert not [a for a in listed if a["name"].startswith("hostile")]


def _sparse_tar(tmp_path, files: dict) -> bytes:
    """A GNU sparse .tar.gz of ``files`` (name -> bytes, or (leading bytes, size): the rest is a hole that takes
    no disk and almost nothing in the archive)."""
    root = tmp_path / "sparse-src"
    root.mkdir(parents=True)
    for name, content in files.items():
        head, size = content if isinstance(content, tuple) else (content, len(content))
        (root / name).write_bytes(head)
        os.truncate(root / name, size)
    archive = tmp_path / "sparse.tar.gz"
    subprocess.run(["tar", "--sparse", "-czf", str(archive), "-C", str(root), *files], check=True)
    return archive.read_bytes()


def _peak_disk_use(path, stop: threading.Event, peak: list[int]) -> None:
    while not stop.is_set():
        used = 0
        for folder, _, names in os.walk(path):
            for name in names:
                try:
                    used += os.lstat(os.path.join(folder, name)).st_blocks * 512
                except OSError:
                    continue
        peak[0] = max(peak[0], used)
        stop.wait(0.005)


def _upload_watching_disk(client, key, name, archive, data_dir):
    stop, peak = threading.Event(), [0]
    watcher = threading.Thread(target=_peak_disk_use, args=(data_dir, stop, peak))
    watcher.start()
    try:
        response = upload(client, key, name, archive)
    finally:
        stop.set()
        watcher.join()
    return response, peak[0]


def test_sparse_gigabyte_members_are_never_written(server, adapter_sources, tmp_path):
    url, keys, data_dir = server
    alpha = adapter_sources["alpha"]
    weights = (alpha / "adapter_model.safetensors").read_bytes()
    config = (alpha / "adapter_config.json").read_bytes()
    with httpx.Client(base_url=url, timeout=120) as client:
        # A 1 GiB weights file whose header describes a few kilobytes: refused from the header alone.
        archive = _sparse_tar(tmp_path / "padded", {"adapter_config.json": config,
                                                    "adapter_model.safetensors": (weights, GIB)})
        assert len(archive) < 2 * 2**20
        response, peak = _upload_watching_disk(client, keys["acme"], "giant", archive, data_dir)
        assert response.status_code == 422, response.text
        assert "header" in response.json()["error"]["message"]
        assert peak < 64 * 2**20, f"{peak} bytes were written for a refused upload"

        # A good adapter with a 1 GiB extra file: registered, the extra file is never written.
        archive = _sparse_tar(tmp_path / "extra", {"adapter_config.json": config, "adapter_model.safetensors": weights,
                                                   "lorag_adapter.json": (alpha / "lorag_adapter.json").read_bytes(),
                                                   "junk.dat": (b"", GIB)})
        response, peak = _upload_watching_disk(client, keys["acme"], "with-extra", archive, data_dir)
        assert response.status_code == 201, response.text
        assert peak < 64 * 2**20, f"{peak} bytes were written for a 3-file adapter"
        stored = data_dir / "tenants" / "acme" / "adapters" / "with-extra"
        assert sorted(p.name for p in stored.iterdir()) == [
            "adapter_config.json", "adapter_model.safetensors", "lorag_adapter.json"]


def test_weights_whose_tensors_do_not_fit_the_model_are_refused_before_writing(server, tmp_path):
    url, keys, data_dir = server
    # A consistent 1 GiB safetensors file: header and size agree, but the tensor is no LoRA weight of this model.
    header = json.dumps({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": {
        "dtype": "F32", "shape": [4, GIB // 16], "data_offsets": [0, GIB // 4]}}).encode()
    header += b" " * (-len(header) % 8)
    head = len(header).to_bytes(8, "little") + header
    archive = _sparse_tar(tmp_path, {"adapter_config.json": b'{"r": 4, "peft_type": "LORA"}',
                                     "adapter_model.safetensors": (head, len(head) + GIB // 4)})
    with httpx.Client(base_url=url, timeout=120) as client:
        response, peak = _upload_watching_disk(client, keys["acme"], "misfit", archive, data_dir)
    assert response.status_code == 422, response.text
    assert "q_proj" in response.json()["error"]["message"]
    assert peak < 64 * 2**20


def test_nan_weights_are_refused_at_registration_naming_the_tensor(server, adapter_sources, tmp_path):
    from safetensors.torch import load_file, save_file

    url, keys, _ = server
    poisoned = shutil.copytree(adapter_sources["bravo"], tmp_path / "poisoned")
    tensors = load_file(poisoned / "adapter_model.safetensors")
    name = sorted(tensors)[1]
    tensors[name][0, 0] = float("nan")
    save_file(tensors, poisoned / "adapter_model.safetensors")
    with httpx.Client(base_url=url, timeout=60) as client:
        response = upload(client, keys["beta"], "poisoned", tar_of(poisoned))
        assert response.status_code == 422, response.text
        assert name in response.json()["error"]["message"] and "NaN" in response.json()["error"]["message"]
        models = client.get("/v1/models", headers={"Authorization": f"Bearer {keys['beta']}"}).json()["data"]
        assert not [m for m in models if "poisoned" in m["id"]]


def test_quotas_on_adapter_count_and_bytes(tmp_path, tiny_llama_path, retrieval_service, adapter_sources):
    data_dir = tmp_path / "quota-data"
    size = sum(p.stat().st_size for p in adapter_sources["alpha"].iterdir())
    with adapter_server(data_dir, tiny_llama_path, retrieval_service, poll_interval_s=0) as (url, keys, _):
        pass  # tenants created; the quotas below apply from the next start
    from server.app import create_app
    from server.background import serving
    from server.generation.transformers_generator import TransformersGenerator
    from server.settings import ServerSettings

    settings = ServerSettings(
        data_dir=data_dir, server={"admin_key": ADMIN_KEY},
        generation={"model": str(tiny_llama_path), "fallback": "error"}, adapters={"poll_interval_s": 0},
        quotas={"max_adapters": 2, "max_adapter_bytes": int(size * 2.5)},
    )
    generator = TransformersGenerator.from_pretrained(str(tiny_llama_path), device="cpu")
    with serving(create_app(settings, retrieval=retrieval_service, generator=generator)) as url, \
            httpx.Client(base_url=url, timeout=60) as client:
        assert upload(client, keys["acme"], "one", tar_of(adapter_sources["alpha"])).status_code == 201
        assert upload(client, keys["acme"], "two", tar_of(adapter_sources["bravo"])).status_code == 201
        third = upload(client, keys["acme"], "three", tar_of(adapter_sources["charlie"]))
        assert third.status_code == 409, third.text
        assert third.json()["error"]["code"] == "quota_exceeded"
        assert "quotas.max_adapters" in third.json()["error"]["message"]
        # Another tenant has its own count, but two adapters' bytes plus a third exceed the byte quota.
        assert upload(client, keys["beta"], "one", tar_of(adapter_sources["alpha"])).status_code == 201
        assert upload(client, keys["beta"], "two", tar_of(adapter_sources["bravo"])).status_code == 201
        client.delete("/v1/adapters/two", headers={"Authorization": f"Bearer {keys['beta']}"})
        big = shutil.copytree(adapter_sources["charlie"], tmp_path / "big")
        (big / "train_log.jsonl").write_bytes(b"{}\n" * size)
        over = upload(client, keys["beta"], "big", tar_of(big))
        assert over.status_code == 413, over.text
        assert "quotas.max_adapter_bytes" in over.json()["error"]["message"]
    import asyncio

    asyncio.run(generator.close())


def test_allowed_paths_never_reach_into_the_data_dir_even_through_a_link(tmp_path, tiny_llama_path, retrieval_service,
                                                                         adapter_sources):
    from tests.adapters.conftest import install

    data_dir = tmp_path / "data"
    install(adapter_sources["alpha"], data_dir, "acme", "secret")
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "link").symlink_to(data_dir / "tenants" / "acme" / "adapters" / "secret")
    with adapter_server(data_dir, tiny_llama_path, retrieval_service, poll_interval_s=0,
                        allowed_paths=[str(tmp_path)]) as (url, keys, _):
        for path in (data_dir / "tenants" / "acme" / "adapters" / "secret", shared / "link", data_dir, tmp_path):
            response = httpx.post(f"{url}/v1/adapters", headers={"Authorization": f"Bearer {keys['beta']}"},
                                  json={"name": "stolen", "path": str(path)}, timeout=60)
            assert response.status_code == 403, (path, response.text)
            assert "data directory" in response.json()["error"]["message"]
        assert not (data_dir / "tenants" / "beta" / "adapters" / "stolen").exists()
