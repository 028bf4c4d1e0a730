"""`tokenpacker-web` on a free 127.0.0.1 port for the browser, API and docs tests.

Without Gradio (the `web` extra), Selenium or Chromium these tests are skipped, or fail where
TOKENPACKER_REQUIRE_BROWSER=1 (CI's setting).
"""

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path

import pytest

from .server_process import free_port, running_server

STARTUP_TIMEOUT = 60  # seconds: importing Gradio and loading the shipped model take a few


def missing(reason: str):
    """Skips the test, or fails it where the browser tests are required."""
    if os.environ.get("TOKENPACKER_REQUIRE_BROWSER") == "1":
        pytest.fail(f"TOKENPACKER_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


def require_gradio():
    if find_spec("gradio") is None:
        missing("Gradio is not installed (pip install -e '.[web]')")


@contextmanager
def web_server(log_dir: Path, *args: str) -> Iterator[str]:
    """The URL of `tokenpacker-web *args`, the installed console script, while it runs."""
    require_gradio()
    port = free_port()
    command = [str(Path(sys.executable).parent / "tokenpacker-web"), "--port", str(port), *args]
    url = f"http://127.0.0.1:{port}/"
    with running_server(command, url, log_dir / "tokenpacker-web.log", STARTUP_TIMEOUT):
        yield url
