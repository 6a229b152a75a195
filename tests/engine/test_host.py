"""The engine picked by load_generator (generation.engine) and driven as the adapter registry's AdapterHost:
slots sized by adapters.max_resident, host-memory loads, DoRA refused, unload waiting for rows to let go."""

import asyncio
import json
import shutil
import threading

import pytest

from core.errors import Conflict
from adapters.host import AdapterHost, HostAdapter
from server.settings import AdapterSettings, GenerationSettings
from tests.engine.conftest import build_adapter


@pytest.fixture(scope="module")
def qwen2_engine(tiny_qwen2_path):
    from server.generation.factory import load_generator

    settings = GenerationSettings(model=str(tiny_qwen2_path), device="cpu", engine="engine", fallback="error",
                                  max_batch_size=2, max_context_tokens=256)
    generator = load_generator(settings, adapters=AdapterSettings(max_resident=2, max_rank=8))
    yield generator
    asyncio.run(generator.close())


@pytest.fixture(scope="module")
def lora_dir(tiny_qwen2_path, tmp_path_factory):
    return build_adapter(tiny_qwen2_path, tmp_path_factory.mktemp("host-lora") / "lora", seed=3, r=4, lora_alpha=8,
                         target_modules="all-linear")


def host_adapter(key: str, path) -> HostAdapter:
    from safetensors.torch import load_file

    config = json.loads((path / "adapter_config.json").read_text())
    return HostAdapter(key=key, path=path, peft_config=config, tensors=load_file(str(path / "adapter_model.safetensors")))


def test_engine_setting_gives_the_engine_sized_by_the_adapter_settings(qwen2_engine, tiny_qwen2_path):
    from transformers import AutoConfig

    from adapters.manifest import model_fingerprint
    from server.generation.engine_generator import EngineGenerator

    assert isinstance(qwen2_engine, EngineGenerator) and isinstance(qwen2_engine, AdapterHost)
    assert qwen2_engine.adapters.num_slots == 2 and qwen2_engine.adapters.max_rank == 8
    served = qwen2_engine.served_model()
    assert served.name == str(tiny_qwen2_path) and served.device == "cpu"
    assert served.fingerprint == model_fingerprint(AutoConfig.from_pretrained(tiny_qwen2_path))
    assert served.max_adapters == 2 and served.dora is False
    # Only the projections the engine adapts: q/k/v/o and gate/up/down of both layers (no lm_head).
    assert len(served.linear) == 2 * 7 and "lm_head" not in served.linear
    assert served.linear["model.layers.1.mlp.down_proj"] == qwen2_engine.adapters.dims["down_proj"]


def test_host_adapter_loads_from_memory_and_unload_waits_for_its_last_row(qwen2_engine, lora_dir):
    engine = qwen2_engine
    engine.load_adapter("acme:lora@1", host_adapter("acme:lora@1", lora_dir))
    engine.adapters.load("from-disk", lora_dir)  # the path load and the in-memory load fill slots alike
    assert engine.resident_keys() == {"acme:lora@1", "from-disk"}
    slots = engine.adapters.resident()
    for group, module in (("qkv", "q_proj"), ("down", "down_proj")):
        a = engine.adapters.shrink_weight(0, group).view(2, -1, engine.adapters.dims[module][0])  # (slots, width, in)
        assert a[slots["acme:lora@1"] - 1].equal(a[slots["from-disk"] - 1]) and a.abs().sum() > 0
    engine.unload_adapter("from-disk")

    slot = engine.adapters.acquire("acme:lora@1")  # a request that let go (cancelled) but is still in the engine
    unloaded = threading.Event()
    worker = threading.Thread(target=lambda: (engine.unload_adapter("acme:lora@1"), unloaded.set()))
    worker.start()
    assert not unloaded.wait(0.3)  # deferred while the row holds the slot, not refused
    assert engine.resident_keys() == {"acme:lora@1"}
    engine.adapters.release(slot)
    worker.join(timeout=10)
    assert unloaded.is_set() and engine.resident_keys() == set()
    engine.unload_adapter("acme:lora@1")  # already gone: nothing to do, like the transformers host

    assert engine.adapters.acquire(None) == 0  # base rows hold no slot
    engine.load_adapter("busy", host_adapter("busy", lora_dir))
    held = engine.adapters.acquire("busy")
    with pytest.raises(Conflict, match="in use by 1 running request"):
        engine.adapters.unload("busy", wait_s=0.05)
    engine.adapters.release(held)
    engine.unload_adapter("busy")


def test_dora_adapter_is_refused_by_the_engine_and_by_validation(qwen2_engine, lora_dir, tmp_path):
    from adapters.validation import check_adapter_dir
    from server.engine.lora_slots import UnsupportedAdapter

    dora = tmp_path / "dora"
    shutil.copytree(lora_dir, dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(UnsupportedAdapter, match="DoRA"):
        qwen2_engine.load_adapter("dora", host_adapter("dora", dora))
    assert "dora" not in qwen2_engine.resident_keys()
    with pytest.raises(Conflict, match="DoRA adapter .* multi-adapter engine") as refused:
        check_adapter_dir(dora, tenant="acme", name="dora", served=qwen2_engine.served_model(), max_rank=8,
                          max_bytes=2**30)
    assert refused.value.http_status == 409 and 'generation.engine = "transformers"' in str(refused.value)


def test_service_keeps_no_more_adapters_on_the_device_than_the_engine_has_slots(qwen2_engine, tmp_path, caplog):
    from server.hotswap.service import AdapterService
    from server.settings import ServerSettings

    settings = ServerSettings(data_dir=tmp_path, adapters={"max_resident": 5, "poll_interval_s": 0})
    with caplog.at_level("WARNING"):
        service = AdapterService(settings, host=qwen2_engine)
    service.close()
    assert service._residency.max_device == 2
    assert "adapters.max_resident=5 but the generator holds 2 adapters at once" in caplog.text


def test_auto_serves_with_transformers_on_cpu(tiny_llama_path, caplog):
    from server.generation.factory import load_generator
    from server.generation.transformers_generator import TransformersGenerator

    with caplog.at_level("INFO", logger="server.generation.factory"):
        generator = load_generator(GenerationSettings(model=str(tiny_llama_path), device="cpu", fallback="error"))
    try:
        assert isinstance(generator, TransformersGenerator)
        assert "generation.engine is auto on cpu" in caplog.text
    finally:
        asyncio.run(generator.close())


def test_other_architecture_falls_back_to_transformers_with_a_log_line(tmp_path, caplog):
    from transformers import GPT2Config, GPT2LMHeadModel

    from server.generation.factory import load_generator
    from server.generation.transformers_generator import TransformersGenerator
    from tests.model_factory import build_tokenizer

    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=512)).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    with caplog.at_level("WARNING"):
        generator = load_generator(GenerationSettings(model=str(path), device="cpu", engine="engine", fallback="error"))
    try:
        assert isinstance(generator, TransformersGenerator)
        assert "architecture 'gpt2' is not supported" in caplog.text
        assert "falling back to transformers + peft" in caplog.text
    finally:
        asyncio.run(generator.close())


def test_engine_checks_finiteness_where_the_weights_land(qwen2_engine, lora_dir, tmp_path):
    """The service skips the host-side NaN check for the engine (served.checks_finite); the engine refuses
    a NaN adapter at load with a 422 and keeps the adapters it had."""
    from safetensors.torch import load_file, save_file

    from adapters.safetensors_flat import NonFiniteWeights, read_flat

    assert qwen2_engine.served_model().checks_finite
    bad = tmp_path / "nan"
    shutil.copytree(lora_dir, bad)
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    name = sorted(tensors)[-1]
    tensors[name][0, 0] = float("inf")
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    flat = read_flat(bad / "adapter_model.safetensors")
    config = json.loads((bad / "adapter_config.json").read_text())
    before = qwen2_engine.resident_keys()
    with pytest.raises(NonFiniteWeights, match=name.replace(".", r"\.")) as error:
        qwen2_engine.load_adapter("acme:nan@1", HostAdapter(key="acme:nan@1", path=bad, peft_config=config,
                                                            tensors=flat.views(), flat=flat))
    assert error.value.http_status == 422
    assert qwen2_engine.resident_keys() == before


def test_metrics_show_kv_blocks_and_the_prefix_cache_hit_rate(qwen2_engine):
    from server.metrics import Metrics
    from tests.engine.conftest import make_sequence, prompt_of

    metrics = Metrics()
    readings = []

    def stats():
        readings.append(qwen2_engine.kv_cache_stats())
        return readings[-1]

    metrics.watch_engine(stats)
    engine = qwen2_engine.engine
    pool = engine.cache.pool
    prompt = prompt_of(90, 40)  # two full blocks of 16 tokens the second request finds cached
    for _ in range(2):
        seq, collector = make_sequence(engine, prompt, max_tokens=3)
        engine.scheduler.submit(seq)
        assert collector.done.wait(60)
    assert seq.cached == 32
    lines = metrics.render().decode().splitlines()
    assert len(readings) == 1  # one reading per scrape: its used + cached + free come from the same moment
    stats = qwen2_engine.kv_cache_stats()
    assert stats["kv_blocks_used"] == 0 and stats["kv_blocks_cached"] >= 2
    assert stats["kv_blocks_free"] + stats["kv_blocks_cached"] == pool.capacity
    for state in ("used", "cached", "free"):
        assert f'lorag_engine_kv_blocks{{state="{state}"}} {float(stats[f"kv_blocks_{state}"])}' in lines
    assert 0 < pool.stats.hit_rate < 1
    assert f"lorag_engine_prefix_cache_hit_rate {pool.stats.hit_rate}" in lines
