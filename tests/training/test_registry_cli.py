"""``lorag adapters list|show|delete|merge`` through the real CLI, on an adapter trained once."""

import json
import shutil

import pytest
import torch

from lorag.cli import main
from tests.model_factory import copy_without_chat_template


@pytest.fixture
def registry_copy(trained, tmp_path):
    """A private copy of the trained data dir, so deleting does not affect other tests."""
    settings, _ = trained
    copy = tmp_path / "data"
    shutil.copytree(settings.data_dir, copy)
    return copy


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_list_show_delete(registry_copy, capsys):
    code, out, _ = run(capsys, "adapters", "list", "--tenant", "acme", "--data-dir", str(registry_copy), "--json")
    assert code == 0 and [m["name"] for m in json.loads(out)] == ["support-v1"]
    code, out, _ = run(capsys, "adapters", "list", "--tenant", "acme", "--data-dir", str(registry_copy))
    assert code == 0 and "support-v1" in out and "lora" in out

    code, out, _ = run(capsys, "adapters", "show", "--tenant", "acme", "support-v1", "--data-dir", str(registry_copy))
    shown = json.loads(out)
    assert code == 0 and shown["tenant"] == "acme" and shown["metrics"]["steps"] == 6

    code, _, err = run(capsys, "adapters", "show", "--tenant", "acme", "nope", "--data-dir", str(registry_copy))
    assert code == 2 and "tenant 'acme' has no adapter 'nope'" in err

    code, out, _ = run(capsys, "adapters", "delete", "--tenant", "acme", "support-v1", "--data-dir", str(registry_copy))
    assert code == 0 and "deleted" in out
    assert list((registry_copy / "tenants" / "acme" / "adapters").iterdir()) == []
    code, out, _ = run(capsys, "adapters", "list", "--tenant", "acme", "--data-dir", str(registry_copy))
    assert "no adapters" in out


def test_merge_matches_base_plus_adapter(trained, tmp_path, tiny_llama_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    settings, result = trained
    out_dir = tmp_path / "merged"
    code, out, err = run(capsys, "adapters", "merge", "--tenant", "acme", "support-v1", "--out", str(out_dir),
                         "--dtype", "fp32", "--data-dir", str(settings.data_dir))
    assert code == 0, err
    ids = torch.tensor([[1, 5, 9, 30, 42, 7]])
    merged = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_path), str(result.adapter_dir)).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert (out_dir / "tokenizer_config.json").is_file()

    code, _, err = run(capsys, "adapters", "merge", "--tenant", "acme", "support-v1", "--out", str(out_dir),
                       "--data-dir", str(settings.data_dir))
    assert code == 2 and "exists and is not empty" in err


def test_merge_keeps_the_base_dtype_unless_asked_and_says_what_it_wrote(trained, tmp_path, tiny_llama_path, capsys):
    from safetensors import safe_open

    settings, _ = trained
    assert json.loads((tiny_llama_path / "config.json").read_text()).get("dtype", "float32") == "float32"

    def written_dtypes(directory):
        dtypes = set()
        for path in directory.glob("*.safetensors"):
            with safe_open(str(path), "pt") as weights:
                dtypes |= {weights.get_tensor(key).dtype for key in weights.keys()}
        return dtypes

    code, out, err = run(capsys, "adapters", "merge", "--tenant", "acme", "support-v1", "--out", str(tmp_path / "same"),
                         "--data-dir", str(settings.data_dir))
    assert code == 0, err
    assert written_dtypes(tmp_path / "same") == {torch.float32}
    assert f"into {tmp_path / 'same'}: float32 weights" in out and "MB of safetensors" in out

    code, out, err = run(capsys, "adapters", "merge", "--tenant", "acme", "support-v1", "--out", str(tmp_path / "half"),
                         "--dtype", "bf16", "--data-dir", str(settings.data_dir))
    assert code == 0, err
    assert written_dtypes(tmp_path / "half") == {torch.bfloat16} and "bfloat16 weights" in out


def test_merge_refuses_a_4bit_base(trained, tmp_path, tiny_llama_path, capsys):
    settings, _ = trained
    quantised = tmp_path / "base-4bit"
    shutil.copytree(tiny_llama_path, quantised)
    config = json.loads((quantised / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (quantised / "config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, "adapters", "merge", "--tenant", "acme", "support-v1", "--out", str(tmp_path / "m"),
                       "--base", str(quantised), "--data-dir", str(settings.data_dir))
    assert code == 2 and "quantised checkpoint (bitsandbytes)" in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()


def test_train_cli_reports_bad_data_in_one_line(tmp_path, tiny_llama_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "q"}]}\n')
    code, _, err = run(capsys, "train", "--tenant", "acme", "--data", str(bad), "--base", str(tiny_llama_path),
                       "--data-dir", str(tmp_path / "d"))
    assert code == 2
    assert f"lorag train: error: training data file {str(bad)!r}: all 1 records are bad (first: {bad}:1:" in err
    assert "Traceback" not in err


def test_merge_refuses_an_unusable_output_before_loading(trained, tmp_path, capsys):
    settings, _ = trained
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    code, _, err = run(capsys, "adapters", "merge", "--tenant", "acme", "support-v1", "--out", str(a_file),
                       "--data-dir", str(settings.data_dir))
    assert code == 2 and "is a file" in err and "Traceback" not in err
    code, _, err = run(capsys, "adapters", "merge", "--tenant", "acme", "support-v1", "--out", "/proc/lorag-merge",
                       "--data-dir", str(settings.data_dir))
    assert code == 2 and "cannot write merge output '/proc/lorag-merge'" in err


def test_train_cli_refuses_a_base_without_chat_template(tmp_path, tiny_llama_path, capsys):
    base = copy_without_chat_template(tiny_llama_path, tmp_path / "no-template")
    data = tmp_path / "ok.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n')
    code, _, err = run(capsys, "train", "--tenant", "acme", "--data", str(data), "--base", str(base),
                       "--data-dir", str(tmp_path / "d"))
    assert code == 2 and "has no chat template" in err and "Traceback" not in err
    code, _, err = run(capsys, "train", "--tenant", "acme", "--data", str(data), "--base", str(tmp_path / "nope"),
                       "--data-dir", str(tmp_path / "d"))
    assert code == 2 and "base model directory" in err and "does not exist" in err
