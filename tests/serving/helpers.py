"""Shared pieces of the serving tests: vLLM's environment, a "slice" copy of the shipped model, the reference."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tokenpacker import TokenPackerForConditionalGeneration, TokenPackerProcessor
from tokenpacker.shapes import PRETRAINED

REPO_ROOT = Path(__file__).resolve().parents[2]


def vllm_environment(tmp_path: Path) -> dict[str, str]:
    """vLLM's settings for this machine: a small CPU KV cache and a private cache folder."""
    return {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache"),
        "VLLM_NO_USAGE_STATS": "1",
        "HF_HUB_OFFLINE": "1",
    }


def slice_model(tmp_path: Path) -> Path:
    """A copy of the shipped tiny model in "slice" (HD) mode: the same weights, crops by grid."""
    target = tmp_path / "tiny-shapes-slice"
    shutil.copytree(PRETRAINED, target)
    for name, section in (("config.json", None), ("processor_config.json", "image_processor")):
        settings = json.loads((target / name).read_text())
        (settings[section] if section else settings)["image_aspect_ratio"] = "slice"
        (target / name).write_text(json.dumps(settings, indent=2))
    return target


def run_vllm_greedy(model_dir: Path, requests: list[dict], tmp_path: Path, timeout: float = 420) -> list[dict]:
    """Greedy answers of vLLM's offline engine, run in a child process bounded by `timeout` seconds."""
    requests_path, output_path = tmp_path / "requests.json", tmp_path / "outputs.json"
    requests_path.write_text(json.dumps(requests))
    command = [sys.executable, "-m", "tests.serving.vllm_greedy", str(model_dir), str(requests_path), str(output_path)]
    completed = subprocess.run(
        command, cwd=REPO_ROOT, env=vllm_environment(tmp_path), capture_output=True, text=True, timeout=timeout
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return json.loads(output_path.read_text())


def transformers_greedy(model_dir: Path, requests: list[dict]) -> list[dict]:
    """The same requests through the package's processor and transformers' `generate`, one at a time: prompt ids,
    greedy ids and their log-probabilities (of the logits with `<image>` and `<pad>` suppressed)."""
    from PIL import Image

    processor = TokenPackerProcessor.from_pretrained(model_dir)
    model = TokenPackerForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    suppressed = [model.config.image_token_id, model.config.text_config.pad_token_id]
    results = []
    for request in requests:
        images = [Image.open(path) for path in request["images"]]
        inputs = processor(images=images, text=request["prompt"], return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(
                **inputs, do_sample=False, max_new_tokens=request["max_tokens"], suppress_tokens=suppressed,
                output_scores=True, return_dict_in_generate=True,
            )  # fmt: skip
        prompt_ids = inputs["input_ids"][0].tolist()
        token_ids = generated.sequences[0, len(prompt_ids) :].tolist()
        logprobs = [score[0].log_softmax(-1)[token].item() for score, token in zip(generated.scores, token_ids)]
        results.append({"prompt_token_ids": prompt_ids, "token_ids": token_ids, "logprobs": logprobs})
    return results


def assert_served_like_transformers(served: list[dict], reference: list[dict]) -> None:
    """vLLM's prompt ids and greedy ids equal transformers', and the greedy tokens' log-probabilities agree."""
    for got, expected in zip(served, reference, strict=True):
        assert got["prompt_token_ids"] == expected["prompt_token_ids"]
        assert got["token_ids"] == expected["token_ids"]
        assert got["logprobs"] == pytest.approx(expected["logprobs"], abs=1e-3)
