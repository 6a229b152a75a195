"""The ``lorag`` command itself: version, help, and library noise kept out of its output."""

import os
import subprocess
import sys

import pytest

from lorag.cli import main
from tests.conftest import REPO_ROOT
from tests.ingest.pdf_pages import write_pdf
from tests.training.conftest import MEMORISE, write_openai_jsonl


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"lorag {version('lorag')}"


def test_bare_lorag_prints_the_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lorag") and "ingest" in out and "serve" in out and "examples:" in out


def run_lorag(*argv, data_dir) -> subprocess.CompletedProcess:
    env = {**os.environ, "CI": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "lorag.cli", *argv, "--data-dir", str(data_dir)], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_pypdf_messages_are_attributed_to_their_file(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    write_pdf(docs / "good.pdf", [["The pump runs at forty litres per minute."]])
    broken = write_pdf(docs / "no-eof.pdf", [["The valve is inspected yearly."]])
    content = broken.read_bytes()
    broken.write_bytes(content[: content.rfind(b"%%EOF")])  # what an interrupted download leaves

    completed = run_lorag("ingest", str(docs), "--tenant", "acme", data_dir=tmp_path / "data")
    assert completed.returncode == 1, completed.stderr  # the broken file failed, the good one was ingested
    output = completed.stdout + completed.stderr
    lines = [line for line in output.splitlines() if "EOF marker not found" in line]
    assert lines and all("no-eof.pdf" in line for line in lines), output
    assert "pypdf._reader" not in output


@pytest.mark.slow
def test_library_warnings_stay_out_of_the_output_unless_verbose(tmp_path, tiny_llama_path):
    data = write_openai_jsonl(tmp_path / "train.jsonl", MEMORISE)
    argv = ["train", "--tenant", "acme", "--data", str(data), "--base", str(tiny_llama_path), "--max-steps", "1",
            "--val-split", "0"]
    completed = run_lorag(*argv, "--name", "quiet", data_dir=tmp_path / "data")
    assert completed.returncode == 0, completed.stderr
    assert "Warning:" not in completed.stderr and "warnings.warn(" not in completed.stderr, completed.stderr
    # -v shows them, as log records naming where they come from.
    verbose = run_lorag(*argv, "--name", "loud", "-v", data_dir=tmp_path / "data")
    assert verbose.returncode == 0, verbose.stderr
    assert "py.warnings" in verbose.stderr and "FutureWarning" in verbose.stderr
