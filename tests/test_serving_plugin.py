"""The vLLM plugin's packaging, checked without vLLM: the entry point vLLM reads, and no vLLM import until it loads."""

import importlib.metadata
import subprocess
import sys


def test_the_vllm_plugin_entry_point_names_the_register_function():
    plugins = {entry.name: entry.value for entry in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert plugins.get("tokenpacker") == "tokenpacker.serving:register"


def test_importing_the_package_and_its_serving_module_does_not_import_vllm():
    code = (
        "import sys, tokenpacker, tokenpacker.serving, tokenpacker.modeling, tokenpacker.processing\n"
        "assert not [name for name in sys.modules if name == 'vllm' or name.startswith('vllm.')], 'vllm imported'\n"
        "assert 'tokenpacker.serving.model' not in sys.modules\n"
        "print(tokenpacker.serving.MODEL_ARCHITECTURE)"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip() == "TokenPackerForConditionalGeneration"
