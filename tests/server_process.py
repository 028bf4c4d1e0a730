"""A server started as a subprocess on a free 127.0.0.1 port, waited for within a bound, and stopped afterwards."""

import socket
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def answers(url: str, timeout: float) -> bool:
    """Whether a GET of `url` gets a 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


@contextmanager
def running_server(command: list[str], ready_url: str, log_path: Path, startup_timeout: float, **popen_kwargs):
    """Runs `command` (its output into `log_path`) until `ready_url` answers 200; the test fails with the log's end if
    it exits or takes longer than `startup_timeout` seconds. Terminated (then killed) on exit."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, **popen_kwargs)
    try:
        deadline, name = time.monotonic() + startup_timeout, " ".join(command)
        while not answers(ready_url, timeout=5):
            if process.poll() is not None:
                pytest.fail(f"{name} exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{name} did not start in {startup_timeout} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
