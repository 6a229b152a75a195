"""Settings precedence (defaults < TOML < environment < flags) and the errors users see."""

import pytest

from core.errors import LoragError
from core.settings import Settings, load_settings
from server.settings import ServerSettings


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "lorag.toml"
    path.write_text('data_dir = "/from/toml"\n[retrieval]\nk = 3\nrrf_k = 10\n[chunking]\nchunk_tokens = 100\n')
    return path


def test_each_layer_overrides_the_one_below(config_file, monkeypatch):
    monkeypatch.delenv("LORAG_DATA_DIR", raising=False)  # the test session sets one; here TOML must win
    monkeypatch.setenv("LORAG_RETRIEVAL__K", "9")
    settings = load_settings(Settings, config_file=config_file, chunking={"chunk_tokens": 120}, data_dir=None)
    assert str(settings.data_dir) == "/from/toml"  # TOML over the default; a None flag hides nothing
    assert settings.retrieval.k == 9  # environment over TOML
    assert settings.retrieval.rrf_k == 10  # TOML fields the environment did not set survive (deep merge)
    assert settings.chunking.chunk_tokens == 120  # flags over everything
    assert settings.retrieval.candidates == Settings().retrieval.candidates  # untouched default


def test_config_file_from_environment(config_file, monkeypatch):
    monkeypatch.setenv("LORAG_CONFIG", str(config_file))
    assert load_settings(Settings).retrieval.k == 3


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(LoragError, match="config file .*nope.toml.* does not exist"):
        load_settings(Settings, config_file=tmp_path / "nope.toml")


def test_bad_values_name_the_field_and_the_value(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAG_RETRIEVAL__K", "abc")
    with pytest.raises(LoragError, match=r"retrieval\.k: .*valid integer.*\(got 'abc'\)"):
        load_settings(Settings)
    monkeypatch.delenv("LORAG_RETRIEVAL__K")
    broken = tmp_path / "broken.toml"
    broken.write_text("k = [\n")
    with pytest.raises(LoragError, match="broken.toml"):
        load_settings(Settings, config_file=broken)


def test_secrets_are_never_echoed_in_errors(monkeypatch):
    monkeypatch.setenv("LORAG_SERVER__ADMIN_KEY", "short-but-secret")
    with pytest.raises(LoragError) as caught:
        load_settings(ServerSettings, server={"host": "0.0.0.0"})
    assert "admin_key is unsafe" in str(caught.value)
    assert "short-but-secret" not in str(caught.value)


def test_chunks_must_fit_the_embedder_window():
    with pytest.raises(LoragError, match="chunk_tokens=5000 exceeds embedding.max_seq_length=256"):
        load_settings(Settings, chunking={"chunk_tokens": 5000})
    with pytest.raises(LoragError, match="overlap_tokens=200 must be smaller than chunking.chunk_tokens=100"):
        load_settings(Settings, chunking={"chunk_tokens": 100, "overlap_tokens": 200})


def test_a_directory_is_not_a_config_file(tmp_path):
    with pytest.raises(LoragError, match="is not a file"):
        load_settings(Settings, config_file=tmp_path)


def test_confidence_power_is_bounded():
    from core.settings import RetrievalSettings

    assert RetrievalSettings(confidence_power=0).confidence_power == 0
    for bad in (-0.5, 10):
        with pytest.raises(ValueError, match="confidence_power"):
            RetrievalSettings(confidence_power=bad)
