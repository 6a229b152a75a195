"""Every validation rule refuses a bad adapter with a message naming the file or field and the reason."""

import io
import json
import shutil
import tarfile
import zipfile

import pytest

from core.errors import Conflict
from adapters.archive import extract_adapter_archive
from adapters.host import ServedModel
from adapters.validation import check_adapter_dir, read_host_adapter
from adapters.registry import InvalidAdapter, validate_adapter_name
from tests.adapters.conftest import make_adapter


@pytest.fixture(scope="module")
def served(tiny_llama_path):
    from transformers import AutoModelForCausalLM

    return ServedModel.of_module(AutoModelForCausalLM.from_pretrained(tiny_llama_path), name=str(tiny_llama_path))


def check(path, served, *, name="good", max_rank=64):
    return check_adapter_dir(path, tenant="acme", name=name, served=served, max_rank=max_rank, max_bytes=10**8)


def copy(adapter_sources, tmp_path, name="alpha"):
    return shutil.copytree(adapter_sources[name], tmp_path / name)


def test_a_good_adapter_passes_and_reads_into_host_memory(adapter_sources, served):
    checked = check(adapter_sources["alpha"], served)
    assert checked.rank == 4 and checked.method == "lora" and "." not in checked.key
    host = read_host_adapter(checked)
    assert host.key == checked.key and host.nbytes > 0
    assert all(key.startswith("base_model.model.model.layers.") for key in host.tensors)
    assert check(adapter_sources["bravo"], served).version != checked.version


@pytest.mark.parametrize("name", ["../evil", "a/b", ".hidden", "x..y", "", "a" * 64, "name with space"])
def test_names_with_path_tricks_are_refused(name):
    with pytest.raises(InvalidAdapter, match="invalid adapter name"):
        validate_adapter_name(name)


@pytest.mark.parametrize("file_name", ["adapter_model.bin", "adapter_model.pt"])
def test_weights_only_as_a_pickle_are_refused(adapter_sources, served, tmp_path, file_name):
    path = copy(adapter_sources, tmp_path)
    (path / "adapter_model.safetensors").rename(path / file_name)
    with pytest.raises(InvalidAdapter, match=f"only in '{file_name}'.*pickle"):
        check(path, served)


def test_missing_safetensors_is_refused(adapter_sources, served, tmp_path):
    path = copy(adapter_sources, tmp_path)
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(InvalidAdapter, match="adapter_model.safetensors is missing"):
        check(path, served)


def test_other_base_model_fingerprint_is_a_conflict(adapter_sources, served, tmp_path):
    path = copy(adapter_sources, tmp_path)
    manifest = json.loads((path / "lorag_adapter.json").read_text())
    (path / "lorag_adapter.json").write_text(json.dumps(manifest | {"base_fingerprint": "sha256:0000000000000000"}))
    with pytest.raises(Conflict, match="fingerprint sha256:0000000000000000"):
        check(path, served)



def test_a_manifest_nested_past_the_parsers_limit_is_refused_by_name(adapter_sources, served, tmp_path):
    """A RecursionError from the JSON parser is the manifest's fault, named as such, never a 500."""
    from core.errors import LoragError

    path = shutil.copytree(adapter_sources["alpha"], tmp_path / "deep")
    (path / "lorag_adapter.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(LoragError, match="not readable JSON"):
        check(path, served)

def test_rank_over_the_limit_is_refused(adapter_sources, served):
    with pytest.raises(InvalidAdapter, match=r"rank 4, over adapters.max_rank=2"):
        check(adapter_sources["alpha"], served, max_rank=2)


def test_target_module_the_model_lacks_is_refused(adapter_sources, served, tmp_path):
    path = copy(adapter_sources, tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps(config | {"target_modules": ["q_proj", "c_attn"]}))
    with pytest.raises(InvalidAdapter, match=r"target_modules.*\['c_attn'\]"):
        check(path, served)


def test_tensor_shapes_must_fit_the_served_model(adapter_sources, served, tmp_path):
    from safetensors.torch import load_file, save_file

    path = copy(adapter_sources, tmp_path)
    tensors = load_file(path / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    tensors[key] = tensors[key][:, :32].contiguous()  # (r, in) with the wrong in_features
    save_file(tensors, path / "adapter_model.safetensors")
    with pytest.raises(InvalidAdapter, match=r"q_proj.*expected \(4, 64\)"):
        check(path, served)


def test_tensor_for_a_module_the_model_lacks_is_refused(adapter_sources, served, tmp_path):
    from safetensors.torch import load_file, save_file

    path = copy(adapter_sources, tmp_path)
    tensors = load_file(path / "adapter_model.safetensors")
    tensors = {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}
    save_file(tensors, path / "adapter_model.safetensors")
    with pytest.raises(InvalidAdapter, match=r"module 'model.layers.7.self_attn.*does not have"):
        check(path, served)


def test_plain_peft_dir_needs_the_served_base_model(tiny_llama_path, served, tmp_path):
    plain = make_adapter(tiny_llama_path, tmp_path / "plain", seed=5, manifest=False)
    checked = check(plain, served)
    assert checked.manifest is None and checked.method == "lora"
    config = json.loads((plain / "adapter_config.json").read_text())
    (plain / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "meta/other-7b"}))
    with pytest.raises(Conflict, match="base_model_name_or_path.*'meta/other-7b'"):
        check(plain, served)


def _tar(tmp_path, members):
    path = tmp_path / "upload.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("member, kind, reason", [
    ("/etc/evil", "file", "absolute or escaping"),
    ("../evil", "file", "absolute or escaping"),
    ("adapter/../../evil", "file", "absolute or escaping"),
    ("link", "symlink", "link or special file"),
])
def test_unsafe_tar_members_are_refused(tmp_path, member, kind, reason):
    archive = _tar(tmp_path, [(member, b"x", kind)])
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(InvalidAdapter, match=reason):
        extract_adapter_archive(archive, "upload.tar.gz", dest, max_bytes=10**6)
    assert not (tmp_path / "evil").exists()


def test_clashing_tar_members_are_named_without_server_paths(tmp_path):
    archive = _tar(tmp_path, [("loss.png", b"x", "file"), ("loss.png/loss.png", b"y", "file")])
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(InvalidAdapter, match="conflicting members at 'loss.png'") as refused:
        extract_adapter_archive(archive, "upload.tar", dest, max_bytes=10**6)
    assert str(tmp_path) not in str(refused.value)


def test_archive_size_limit_counts_unpacked_bytes(tmp_path):
    zipped = tmp_path / "bomb.zip"
    with zipfile.ZipFile(zipped, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        bundle.writestr("adapter_model.safetensors", b"\0" * 200_000)  # compresses to almost nothing
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(InvalidAdapter, match="max_upload_bytes=100000"):
        extract_adapter_archive(zipped, "bomb.zip", dest, max_bytes=100_000)
    with pytest.raises(InvalidAdapter, match="expected a .tar.gz"):
        extract_adapter_archive(zipped, "bomb.rar", dest, max_bytes=100_000)


def test_zip_with_escaping_member_is_refused(tmp_path):
    zipped = tmp_path / "evil.zip"
    with zipfile.ZipFile(zipped, "w") as bundle:
        bundle.writestr("../../evil", b"x")
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(InvalidAdapter, match="absolute or escaping"):
        extract_adapter_archive(zipped, "evil.zip", dest, max_bytes=10**6)


def test_weights_rewritten_after_validation_are_refused_at_load(adapter_sources, served, tmp_path):
    import os

    from safetensors.torch import load_file, save_file

    path = copy(adapter_sources, tmp_path)
    checked = check(path, served)
    weights = path / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({key: value * 2 for key, value in tensors.items()}, weights)
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # a coarse clock must not hide it
    with pytest.raises(Conflict, match="changed since it was validated"):
        read_host_adapter(checked)
    assert read_host_adapter(check(path, served)).tensors.keys() == tensors.keys()  # re-validated: fine


def _with_targets(adapter_sources, tmp_path, targets):
    """A copy of an adapter dir whose adapter_config.json names ``targets`` as target_modules."""
    path = copy(adapter_sources, tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps(config | {"target_modules": targets}))
    return path


def test_target_modules_pattern_that_backtracks_forever_is_refused_in_time(adapter_sources, served, tmp_path):
    """peft matches a string target_modules with re.fullmatch; "(.*)*x" backtracks exponentially over a module
    name (minutes for one name), so validation stops it at its time limit and refuses the adapter."""
    path = _with_targets(adapter_sources, tmp_path, "(.*)*x|.*q_proj")
    with pytest.raises(InvalidAdapter, match=r"target_modules.*takes over 2 s to match"):
        check(path, served)


def test_target_modules_pattern_that_is_no_regex_is_refused(adapter_sources, served, tmp_path):
    path = _with_targets(adapter_sources, tmp_path, "(q_proj")
    with pytest.raises(InvalidAdapter, match=r"target_modules.*is not a valid regular expression"):
        check(path, served)
    # patterns that break the compiler other than by syntax: a repeat count too large, groups nested too deep
    for number, pattern in enumerate(["q_proj{4294967296}", "(" * 1000 + "q_proj" + ")" * 1000]):
        path = _with_targets(adapter_sources, tmp_path / str(number), pattern)
        with pytest.raises(InvalidAdapter, match=r"target_modules.*is not a valid regular expression"):
            check(path, served)


def test_target_modules_pattern_matching_the_model_is_accepted(adapter_sources, served, tmp_path):
    path = _with_targets(adapter_sources, tmp_path, r".*\.(q_proj|v_proj)")
    check(path, served)


def test_target_modules_check_that_cannot_run_is_no_verdict_on_the_adapter(adapter_sources, served, tmp_path,
                                                                            monkeypatch):
    """When the matching process fails (here: the interpreter cannot start) the adapter is not called invalid:
    a 503-style CheckUnavailable says to try again."""
    import adapters.validation as validation

    path = _with_targets(adapter_sources, tmp_path, r".*\.q_proj")
    monkeypatch.setattr(validation.sys, "executable", "/bin/false")
    with pytest.raises(validation.CheckUnavailable, match="the process matching it failed"):
        check(path, served)
    monkeypatch.setattr(validation.sys, "executable", str(tmp_path / "no-such-python"))
    with pytest.raises(validation.CheckUnavailable, match="could not run"):
        check(path, served)


def test_target_modules_pattern_too_long_is_refused(adapter_sources, served, tmp_path):
    path = _with_targets(adapter_sources, tmp_path, "q_proj|" * 1000)
    with pytest.raises(InvalidAdapter, match="over 4096"):
        check(path, served)
