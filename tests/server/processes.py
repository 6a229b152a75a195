"""Servers the tests start as processes of their own (`lorag serve` replicas, a real vLLM): a free loopback port,
and a context that starts a command, waits until it answers, and stops it."""

import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serving_process(command: list[str], *, ready_url: str, log_path: Path, env: dict, timeout_s: float,
                    cwd: Path | None = None, stop_timeout_s: float = 30):
    """Run ``command`` (its output into ``log_path``) until ``ready_url`` answers 200, then yield the process;
    terminate it on exit. Fails the test with the log's tail when it exits or is not ready in ``timeout_s``."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    started = time.monotonic()
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"{command[2]} exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            if time.monotonic() - started > timeout_s:
                pytest.fail(f"{command[2]} did not answer within {timeout_s} s:\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=stop_timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
