"""Runs Python code in a fresh process in which `tokenpacker` cannot be imported, as for a user who only has
transformers and torch."""

import json
import os
import subprocess
import sys
import textwrap

BLOCK_TOKENPACKER = """
import importlib.abc, os, sys
sys.path[:] = [p for p in sys.path if os.path.abspath(p) not in ({root!r}, os.path.join({root!r}, "tests"))]

class _NoTokenPacker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "tokenpacker" or name.startswith("tokenpacker."):
            raise ImportError("tokenpacker is not installed here")

sys.meta_path.insert(0, _NoTokenPacker())
"""


def run_without_tokenpacker(code: str, tmp_path, **env) -> dict:
    """Runs `code`, which must print one JSON object on its last line, and returns that object."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = BLOCK_TOKENPACKER.format(root=root) + textwrap.dedent(code)
    environment = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HOME": str(tmp_path / "hf"), **env}
    environment.pop("PYTHONPATH", None)
    script_file = tmp_path / "remote_script.py"
    script_file.write_text(script)
    result = subprocess.run(
        [sys.executable, str(script_file)], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
