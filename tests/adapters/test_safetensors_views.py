"""The flat safetensors reader: same tensors as the safetensors library, zero-copy views, one clear error
per malformed file, and the bulk finiteness check naming the bad tensor."""

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters.safetensors_flat import InvalidSafetensors, read_flat


@pytest.fixture
def weights(tmp_path):
    tensors = {"layers.0.lora_A.weight": torch.randn(4, 16), "layers.0.lora_B.weight": torch.randn(16, 4),
               "layers.1.lora_A.weight": torch.randn(4, 16).bfloat16(), "step": torch.tensor([3])}
    path = tmp_path / "adapter_model.safetensors"
    save_file(tensors, path)
    return path


def test_views_equal_the_library_and_share_one_buffer(weights):
    flat = read_flat(weights)
    expected = load_file(weights)
    views = flat.views()
    assert views.keys() == expected.keys()
    for name, tensor in expected.items():
        assert views[name].dtype == tensor.dtype and torch.equal(views[name], tensor)
        assert views[name].untyped_storage().data_ptr() == flat.data.untyped_storage().data_ptr()
    assert flat.nbytes == sum(t.numel() * t.element_size() for t in expected.values())
    assert flat.first_non_finite() is None
    moved = flat.to("cpu")
    assert torch.equal(moved.view("step"), torch.tensor([3]))


def test_the_non_finite_tensor_is_named(tmp_path):
    path = tmp_path / "w.safetensors"
    bad = torch.randn(3, 5)
    bad[1, 2] = float("nan")
    save_file({"a": torch.randn(2, 2), "b": bad, "c": torch.randn(7)}, path)
    assert read_flat(path).first_non_finite() == "b"


def _write(path, header: bytes, data: bytes = b"", *, length: int | None = None):
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


@pytest.mark.parametrize("header, data, length, reason", [
    (b"", b"", 2**40, "over the format's limit"),
    (b"{not json", b"", None, "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, b"", None, "not valid JSON"),  # nested past the parser's recursion limit
    (b"[1, 2]", b"", None, "must be a JSON object"),
    (json.dumps({"t": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}).encode(), b"\0" * 4, None,
     "unsupported dtype"),
    (json.dumps({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}).encode(), b"\0" * 4, None,
     "do not fit its shape"),
    (json.dumps({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode(), b"\0" * 8, None,
     "do not fit its shape"),
    (json.dumps({"t": {"dtype": "F32", "shape": "x", "data_offsets": [0, 4]}}).encode(), b"\0" * 4, None,
     "malformed shape"),
    (json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}).encode(), b"\0" * 12, None, "overlap"),
    (json.dumps({"t": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}).encode(), b"\0" * 8, None,
     "not aligned"),
])
def test_malformed_files_are_refused_with_the_reason(tmp_path, header, data, length, reason):
    path = _write(tmp_path / "bad.safetensors", header, data, length=length)
    with pytest.raises(InvalidSafetensors, match=reason) as error:
        read_flat(path)
    assert "bad.safetensors" in str(error.value)


def test_truncated_and_tiny_files_are_refused(tmp_path, weights):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(InvalidSafetensors, match="truncated|do not fit"):
        read_flat(cut)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x01\x02")
    with pytest.raises(InvalidSafetensors, match="too short"):
        read_flat(tiny)
