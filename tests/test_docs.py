"""Every shell command and Python block of README.md and docs/*.md, run the way a reader runs them.

The blocks are the ```bash, ```sh, ```console and ```python fences of the markdown, found by parsing it; a test id is
`<file>::<heading>` (with `#2`, `#3`... for further blocks under the same heading). The blocks of one page run in
order, in one working folder per page (holding copies of benchmarks/ and tests/), as a reader follows the page.

Conventions in the markdown:
- A shell command (a line with its `\\` continuations) whose trailing comment says "needs a GPU" is not run here:
  it is taken out of its block and reported as its own test, skipped with that reason. A Python block with such a
  comment is skipped whole.
- Nothing else is marked: what differs here from a user's machine is in the tables below, by name.

The tables:
- SETUP_COMMANDS: the README's set-up commands, matched exactly (they create the .venv that runs this suite).
- REPLACEMENTS: documented strings -> what runs here, applied in order to every block: Hub ids and placeholder paths
  become local folders and files built once per session ({name} fields), long runs get smaller arguments.
- REAL_SIZE: commands that take minutes and GBs at the real model sizes; skipped by name unless
  TOKENPACKER_DOCS_FULL=1.
- VLLM_ENVIRONMENT: commands and Python blocks (by a line they hold) that run in vLLM's environment (.venv-vllm), not
  in this suite's; skipped by name, with where they do run.
- WEB_DEMO: the web demo's install and server commands; skipped by name. Python blocks that name its address
  (WEB_ADDRESS) run against the `web_demo` server of conftest.py (skipped without Gradio, as tests/test_web.py is).
Shell blocks run in bash (`set -e`) with the running interpreter for `.venv/bin/python` and `python`, its folder
(the console scripts) first on PATH, and huggingface_hub pointed at a Hub server on 127.0.0.1 (`your-name` may
write there). Python blocks run in this process, each in a fresh namespace.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tokenpacker.conversion import convert_checkpoint
from tokenpacker.processing import fast_tokenizer_from_sentencepiece
from tokenpacker.shapes import PRETRAINED, conversation, render_scene

from .builders import train_sentencepiece
from .hub_server import HubServer, hub_environment, point_huggingface_hub_at
from .original_checkpoints import write_original_release

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGUAGES = ("bash", "sh", "console")
GPU_MARK = re.compile(r"\s#[^'\"]*\bneeds a GPU\b")
TIMEOUT_S = 300
HUB_TOKEN = "hf_your_name_token"

SETUP_COMMANDS = {
    'python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 -e ".[test]" && .venv/bin/python -m pytest -q': (
        None,
        "this is the command that runs the suite",
    ),
    "python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 -e . && .venv/bin/python -m tokenpacker.demo": (
        ".venv/bin/python -m tokenpacker.demo",
        "the set-up part creates the .venv that runs this suite: only the demo runs here",
    ),
}

REPLACEMENTS = [
    (".venv/bin/python", "{python}"),
    ("path/to/converted-checkpoint", "{converted}"),
    ("photo.jpg", "{image}"),
    ("tokenpacker-convert --checkpoint TokenPacker-7b-144token", "tokenpacker-convert --checkpoint {original} --vision-tower {clip}"),
    ("--checkpoint TokenPacker-HD-13b-16patch-64token", "--checkpoint {original_hd}"),
    ('convert_checkpoint(\n    "TokenPacker-7b-144token",', 'convert_checkpoint(\n    "{original}",'),
    ("openai/clip-vit-large-patch14-336", "{clip}"),
    ("lmsys/vicuna-7b-v1.5", "{llm}"),
    ("--bf16", "--bf16 --use-cpu"),
    ("--config_file tokenpacker/configs/", "--config_file {configs}/"),
    ("shapes data --output-dir runs/shapes", "shapes data --output-dir runs/shapes --num-train 16 --num-test 6"),
    ("--base-dir runs/base --output-dir runs/tiny-shapes", "--base-dir runs/base --output-dir runs/tiny-shapes --max-steps 2"),
    ("shapes base --output-dir runs/base", "shapes base --output-dir runs/base --pretraining-steps 2"),
    (
        "reproduce --output-dir runs/reproduce",
        "reproduce --output-dir runs/reproduce --num-train 16 --num-test 6 --pretraining-steps 2 --max-steps 2",
    ),
    ("--max-steps 3000", "--max-steps 2"),
    ("--tokenpacker-model runs/tiny-shapes", "--tokenpacker-model runs/tiny-shapes --probe-train 12 --probe-test 6"),
    ("ship --model runs/tiny-shapes --force", "ship --model runs/tiny-shapes --output-dir runs/shipped"),
    ("benchmarks/analytic.py", "benchmarks/analytic.py --llm 7B"),
    ("benchmarks/image_processing.py", "benchmarks/image_processing.py --seconds 0.1 --rounds 1"),
    ("playground/data/eval/", "tests/evaluation_fixtures/"),
    ("--model-path tokenpacker/pretrained/tiny-shapes", f"--model-path {PRETRAINED}"),
    ("benchmarks/evaluation.py", "benchmarks/evaluation.py --questions 2 --models tiny-shapes"),
]

REAL_SIZE = {
    ".venv/bin/python benchmarks/projector.py": "the real projector size (4096 input channels) in 2 dtypes",
    ".venv/bin/python benchmarks/end_to_end.py              # 2 layers of Vicuna-7B's shape, CPU": (
        "a 1.5 GB model of Vicuna-7B's width beside LLaVA-1.5's"
    ),
    "python benchmarks/conversion_memory.py --size-gb 3 --shard-gb 1": "writes and converts a 4 GB checkpoint",
}

VLLM_ENVIRONMENT = {
    "bash tokenpacker/serving/setup_cpu_env.sh": "builds .venv-vllm (minutes): the vLLM job of .ci/run runs it",
    "VLLM_CPU_KVCACHE_SPACE=1 VLLM_CACHE_ROOT=/tmp/vllm-cache .venv-vllm/bin/vllm serve "
    "tokenpacker/pretrained/tiny-shapes \\\n    --dtype float32 --max-model-len 512 "
    "--limit-mm-per-prompt '{\"image\": 1}'": (
        "vllm serve in .venv-vllm: tests/serving/test_server.py starts it this way"
    ),
    "from openai import OpenAI": "a client of vllm serve: tests/serving/test_server.py runs this block against it",
    ".venv-vllm/bin/python benchmarks/serving.py": (
        "four vLLM engines in .venv-vllm (minutes): its results are in docs/serving.md"
    ),
    "VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/tokenpacker-eval generate --backend vllm --enforce-eager \\\n"
    "    --model-path tokenpacker/pretrained/tiny-shapes --question-file runs/shapes-eval/questions.jsonl \\\n"
    "    --image-folder runs/shapes-eval/images --answers-file runs/shapes-eval/answers-vllm.jsonl": (
        "tokenpacker-eval in .venv-vllm: tests/serving/test_evaluation_vllm.py runs it this way"
    ),
    "VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python benchmarks/evaluation.py": (
        "vLLM's engine beside transformers in .venv-vllm (minutes): its results are in docs/evaluation.md"
    ),
}

WEB_DEMO = {
    'pip install -e ".[web]"': "installs Gradio here: .ci/run installs the web extra before it runs the web tests",
    "tokenpacker-web": "a server that runs until stopped: tests/web_server.py starts it for the web tests",
}
WEB_ADDRESS = "http://127.0.0.1:7860/"


@dataclass(frozen=True)
class Block:
    page: Path
    heading: str
    language: str
    text: str

    @property
    def is_shell(self) -> bool:
        return self.language in SHELL_LANGUAGES


def read_blocks(page: Path) -> list[tuple[str, Block]]:
    """(test id, block) for every shell and Python fence of `page`, in order."""
    blocks, counts, heading, fence = [], {}, page.stem, None
    for line in page.read_text().splitlines():
        if fence is None and line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif fence is None and line.startswith("```"):
            fence = (line[3:].strip(), [])
        elif fence is not None and line.startswith("```"):
            language, lines = fence
            fence = None
            if language in SHELL_LANGUAGES or language == "python":
                counts[heading] = counts.get(heading, 0) + 1
                number = f"#{counts[heading]}" if counts[heading] > 1 else ""
                name = f"{page.relative_to(ROOT)}::{heading}{number}"
                blocks.append((name, Block(page, heading, language, "\n".join(lines) + "\n")))
        elif fence is not None:
            fence[1].append(line)
    return blocks


def shell_commands(text: str) -> list[str]:
    """The commands of a shell block: lines joined with their `\\` continuations (comment lines dropped)."""
    commands, current = [], ""
    for line in text.splitlines():
        current += line
        if current.endswith("\\"):
            current += "\n"
            continue
        if current.strip() and not current.lstrip().startswith("#"):
            commands.append(current)
        current = ""
    return commands


BLOCKS = [entry for page in PAGES for entry in read_blocks(page)]
NOT_RUN_HERE = [  # (test id, command, reason): commands taken out of their blocks
    (
        f"{name}::{command.split(' #')[0].strip()[:90]}",
        command,
        "needs a GPU" if GPU_MARK.search(command) else VLLM_ENVIRONMENT.get(command) or WEB_DEMO.get(command),
    )
    for name, block in BLOCKS
    if block.is_shell
    for command in shell_commands(block.text)
    if GPU_MARK.search(command) or command in REAL_SIZE or command in VLLM_ENVIRONMENT or command in WEB_DEMO
]


def run_full() -> bool:
    return os.environ.get("TOKENPACKER_DOCS_FULL") == "1"


def substitute(text: str, places: dict[str, str]) -> str:
    for documented, local in REPLACEMENTS:
        text = text.replace(documented, local.format(**places))
    return text


def package_files_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted(PRETRAINED.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def write_llava_data(folder: Path, json_name: str, image_folder: str, captions: bool):
    """A few LLaVA-style records: stage 1's captions or stage 2's conversations (one text-only)."""
    (folder / image_folder).mkdir()
    records = []
    for index in range(4):
        scene = render_scene("train", index)
        scene.image.save(folder / image_folder / f"{index}.png")
        pairs = [("Render a clear and concise summary of the photo.", f"a {scene.colour} {scene.kind}")]
        records.append({"id": str(index), "image": f"{index}.png", "conversations": conversation(pairs if captions else scene.questions())})
    if not captions:
        records.append({"id": "text", "conversations": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "yes"}]})
    (folder / json_name).write_text(json.dumps(records))


@pytest.fixture(scope="session")
def places(tmp_path_factory):
    """The local folders and files that stand for the documented ones, built once."""
    root = tmp_path_factory.mktemp("docs_inputs")
    original = write_original_release(root / "pad", shards=2)
    hd = write_original_release(root / "hd", image_aspect_ratio="slice", scale_factor=4, patch_num=16, weights="safetensors", shards=1, seed=3)
    converted = convert_checkpoint(original.checkpoint, root / "converted", vision_tower=original.vision_tower).output
    (root / "llm").mkdir()
    tokenizer = fast_tokenizer_from_sentencepiece(train_sentencepiece(root / "llm" / "tokenizer.model"))
    tokenizer.save_pretrained(root / "llm")
    torch.manual_seed(0)
    text_config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    LlamaForCausalLM(text_config).save_pretrained(root / "llm")
    render_scene("test", 1).image.resize((480, 360)).save(root / "photo.jpg")
    return {
        "python": sys.executable,
        "converted": str(converted),
        "image": str(root / "photo.jpg"),
        "original": str(original.checkpoint),
        "original_hd": str(hd.checkpoint),
        "clip": str(original.vision_tower),
        "llm": str(root / "llm"),
        "configs": str(ROOT / "tokenpacker" / "configs"),
    }


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    with HubServer(tokens={HUB_TOKEN: "your-name"}) as server:
        yield server, tmp_path_factory.mktemp("hf_home")


@pytest.fixture(scope="session")
def workspaces(tmp_path_factory):
    """One working folder per page, made on first use: copies of benchmarks/ and tests/, and the training data the
    LLaVA-1.5 recipe names."""
    made = {}

    def workspace(page: Path) -> Path:
        if page not in made:
            folder = tmp_path_factory.mktemp(page.stem)
            for name in ("benchmarks", "tests"):
                shutil.copytree(ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
            write_llava_data(folder, "blip_laion_cc_sbu_558k.json", "llava-pretrain", captions=True)
            write_llava_data(folder, "llava_v1_5_mix665k.json", "data", captions=False)
            made[page] = folder
        return made[page]

    return workspace


def run_shell(script: str, cwd: Path, places: dict, hub) -> subprocess.CompletedProcess:
    server, home = hub
    env = hub_environment(server.endpoint, home, HUB_TOKEN)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["XDG_CACHE_HOME"] = str(cwd / ".cache")  # the demo's random model
    before = package_files_digest()
    result = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
        stdin=subprocess.DEVNULL,  # never the terminal pytest runs in: an interactive command reads EOF and ends
    )
    assert package_files_digest() == before, "a documented command changed the package's shipped model"
    return result


@pytest.mark.parametrize("block", [block for _, block in BLOCKS], ids=[name for name, _ in BLOCKS])
def test_documented_block_runs(block, places, hub, workspaces, monkeypatch, capsys, request):
    cwd = workspaces(block.page)
    if block.is_shell:
        command = block.text.strip()
        if command in SETUP_COMMANDS:
            runnable, reason = SETUP_COMMANDS[command]
            if runnable is None:
                pytest.skip(reason)
            commands = [runnable]
        else:
            commands = [
                command for command in shell_commands(block.text)
                if not GPU_MARK.search(command) and command not in REAL_SIZE and command not in VLLM_ENVIRONMENT
                and command not in WEB_DEMO
            ]  # fmt: skip
        if not commands:
            pytest.skip("every command of this block is reported on its own (see test_command_not_run_here)")
        result = run_shell(substitute("\n".join(commands), places), cwd, places, hub)
        assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        assert "Traceback" not in result.stderr, result.stderr[-5000:]
        return
    if GPU_MARK.search(block.text):
        pytest.skip("needs a GPU")
    for line, reason in VLLM_ENVIRONMENT.items():
        if line in block.text:
            pytest.skip(reason)
    server, home = hub
    point_huggingface_hub_at(monkeypatch, server.endpoint, home / "in_process")
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    monkeypatch.chdir(cwd)
    before = package_files_digest()
    source = substitute(block.text, places)
    if WEB_ADDRESS in source:
        source = source.replace(WEB_ADDRESS, request.getfixturevalue("web_demo"))
    exec(compile(source, f"{block.page.name}::{block.heading}", "exec"), {"__name__": "__docs__"})
    assert package_files_digest() == before
    assert capsys.readouterr().out.strip(), "every Python block of the docs prints what it shows"


@pytest.mark.parametrize(
    "command, reason", [(command, reason) for _, command, reason in NOT_RUN_HERE], ids=[name for name, _, _ in NOT_RUN_HERE]
)
def test_command_not_run_here(command, reason, places, hub, workspaces):
    if reason is not None:
        pytest.skip(reason)
    if not run_full():
        pytest.skip(f"{REAL_SIZE[command]}: minutes at the real size; TOKENPACKER_DOCS_FULL=1 runs it")
    result = run_shell(substitute(command, places), workspaces(ROOT / "docs" / "benchmarks.md"), places, hub)
    assert result.returncode == 0, result.stderr[-5000:]


def test_the_tables_name_only_what_the_docs_hold():
    """A table entry that no block uses any more is stale: the docs changed under it."""
    texts = [block.text for _, block in BLOCKS]
    for documented in [*SETUP_COMMANDS, *REAL_SIZE, *VLLM_ENVIRONMENT, *WEB_DEMO, WEB_ADDRESS]:
        assert any(documented in text for text in texts), documented
    for documented, _ in REPLACEMENTS:
        assert any(documented in text for text in texts), documented
    assert len(BLOCKS) >= 20 and {block.page.name for _, block in BLOCKS} >= {"README.md", "training.md"}


def test_the_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
