"""The serving tests need vLLM: without it they are skipped, or fail where TOKENPACKER_REQUIRE_VLLM=1 (CI's job)."""

import importlib.util
import os
from pathlib import Path

import pytest

SERVING_TESTS = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    if importlib.util.find_spec("vllm") is not None:
        return
    reason = "vLLM is not installed (bash tokenpacker/serving/setup_cpu_env.sh builds .venv-vllm with it)"
    if os.environ.get("TOKENPACKER_REQUIRE_VLLM") == "1":
        raise pytest.UsageError(f"TOKENPACKER_REQUIRE_VLLM=1 but {reason}")
    for item in items:
        if SERVING_TESTS in item.path.parents:
            item.add_marker(pytest.mark.skip(reason=reason))
