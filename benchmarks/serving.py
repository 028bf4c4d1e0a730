"""Offline throughput in vLLM: TokenPacker (144, 64, 36 tokens per image) beside LLaVA-1.5 (576), N requests.

Each model is served by vLLM's offline engine in its own process: TokenPacker through this package's plugin,
LLaVA-1.5 (transformers' `LlavaForConditionalGeneration` layout) through vLLM's built-in implementation. Both have
the same CLIP tower and Llama language model shapes and vLLM's dummy weights (`load_format="dummy"`): speed does not
depend on the values, and every request generates exactly `--max-tokens` tokens (`ignore_eos`). Each request holds
one distinct image (the tiny-shapes scenes), so neither vLLM's multimodal cache nor its prefix cache (off) reuses
work. Reported per model: requests/s, generated tokens/s, prompt tokens per request, the KV-cache size vLLM gave
(in tokens, for the same `--kv-cache-gib`) and how many requests of this length fit in it.

    .venv-vllm/bin/python benchmarks/serving.py [--requests 16] [--max-tokens 32]
    python benchmarks/serving.py --full   # CLIP ViT-L/14-336 and Vicuna-7B shapes, float16 on a GPU

By default (CPU) the shapes are cut down to what a 2-core machine runs in minutes: the tower keeps CLIP ViT-L/14-336's
24x24 patch grid (so the token counts are the real ones) at a smaller width and depth, the language model has 8
layers of width 1024.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tokenpacker import TokenPackerConfig, TokenPackerProcessor  # noqa: E402
from tokenpacker.shapes import PRETRAINED  # noqa: E402

PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. USER: <image>\nDescribe the image. "
    "ASSISTANT:"
)
SHAPES = {
    "cpu": {
        "vision": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4),
        "text": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16),
        "levels": [3, 4, 5, 5],
        "dtype": "float32",
    },
    "full": {
        "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
        "text": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
        "levels": [12, 16, 22, 23],
        "dtype": "float16",
    },
}


def write_models(folder: Path, shapes: dict, scale_factors: list[int]) -> dict[str, Path]:
    """Config, tokenizer and processor folders: LLaVA-1.5 and one TokenPacker per scale factor, same shapes."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers import LlavaProcessor

    tokenizer = AutoTokenizer.from_pretrained(PRETRAINED)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(image_size=336, patch_size=14, projection_dim=768, **shapes["vision"])
    text = LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=4096, rms_norm_eps=1e-5, architectures=["LlamaForCausalLM"],
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **shapes["text"],
    )  # fmt: skip
    folders = {}
    llava = folder / "llava-1.5"
    LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
        architectures=["LlavaForConditionalGeneration"],
    ).save_pretrained(llava)  # fmt: skip
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_center_crop=True
    )
    LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
        image_token="<image>", num_additional_image_tokens=1,
    ).save_pretrained(llava)  # fmt: skip
    folders["LLaVA-1.5 (576)"] = llava
    for scale_factor in scale_factors:
        config = TokenPackerConfig(
            vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=image_token_id,
            scale_factor=scale_factor, multi_level_feature_layers=shapes["levels"],
            projector_hidden_size=vision.hidden_size, slice_separator_token_id=0, row_separator_token_id=0,
            architectures=["TokenPackerForConditionalGeneration"],
        )  # fmt: skip
        target = folder / f"tokenpacker-{config.num_image_tokens}"
        config.save_pretrained(target)
        TokenPackerProcessor.from_model_config(config, tokenizer).save_pretrained(target)
        folders[f"TokenPacker ({config.num_image_tokens})"] = target
    return folders


def run_one(model_dir: str, requests: int, max_tokens: int, dtype: str, output: str):
    """One model in vLLM's offline engine: the throughput of `requests` one-image requests."""
    from vllm import LLM, SamplingParams

    from tokenpacker.shapes import render_scene

    llm = LLM(
        model=model_dir, load_format="dummy", dtype=dtype, max_model_len=1024, enable_prefix_caching=False,
        limit_mm_per_prompt={"image": 1}, seed=0,
    )  # fmt: skip
    prompts = [
        {"prompt": PROMPT, "multi_modal_data": {"image": render_scene("test", index).image}}
        for index in range(requests)
    ]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    llm.generate(prompts[:1], params)  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    cache = llm.llm_engine.vllm_config.cache_config
    prompt_tokens = sum(len(output.prompt_token_ids) for output in outputs) / requests
    generated = sum(len(output.outputs[0].token_ids) for output in outputs)
    kv_tokens = cache.num_gpu_blocks * cache.block_size
    result = {
        "requests_per_s": requests / seconds,
        "generated_tokens_per_s": generated / seconds,
        "prompt_tokens_per_request": prompt_tokens,
        "kv_cache_tokens": kv_tokens,
        "requests_in_kv_cache": int(kv_tokens // (prompt_tokens + max_tokens)),
        "seconds": seconds,
    }
    Path(output).write_text(json.dumps(result))


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--scale-factors", type=int, nargs="+", default=[2, 3, 4], choices=[2, 3, 4])
    parser.add_argument("--kv-cache-gib", type=int, default=1, help="the CPU KV cache (VLLM_CPU_KVCACHE_SPACE)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds for each model's run")
    parser.add_argument("--full", action="store_true", help="CLIP ViT-L/14-336 and Vicuna-7B shapes, on a GPU")
    parser.add_argument("--run-one", nargs=2, metavar=("MODEL_DIR", "OUTPUT_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.requests < 1 or args.max_tokens < 1:
        parser.error("--requests and --max-tokens must be positive")
    shapes = SHAPES["full" if args.full else "cpu"]
    if args.run_one:
        run_one(args.run_one[0], args.requests, args.max_tokens, shapes["dtype"], args.run_one[1])
        return

    work = Path(tempfile.mkdtemp(prefix="tokenpacker-serving-bench-"))
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib),
        "VLLM_CACHE_ROOT": os.environ.get("VLLM_CACHE_ROOT", str(work / "vllm-cache")),
    }
    try:
        results = {}
        for name, folder in write_models(work / "models", shapes, args.scale_factors).items():
            output = work / f"{folder.name}.json"
            command = [sys.executable, __file__, "--run-one", str(folder), str(output), "--requests",
                       str(args.requests), "--max-tokens", str(args.max_tokens)] + (["--full"] if args.full else [])
            completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
            if completed.returncode != 0:
                raise SystemExit(f"{name} failed:\n{completed.stderr[-4000:]}")
            results[name] = json.loads(output.read_text())
        print(report(results, args))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(results: dict[str, dict], args) -> str:
    baseline = results["LLaVA-1.5 (576)"]
    lines = [
        f"{args.requests} requests x {args.max_tokens} generated tokens, one image each "
        f"({'full shapes' if args.full else 'CPU shapes'})",
        "| model (tokens/image) | requests/s | generated tokens/s | prompt tokens/request | KV cache (tokens) "
        "| requests in KV cache | speed vs LLaVA-1.5 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        lines.append(
            f"| {name} | {result['requests_per_s']:.2f} | {result['generated_tokens_per_s']:.1f} "
            f"| {result['prompt_tokens_per_request']:.0f} | {result['kv_cache_tokens']:,} "
            f"| {result['requests_in_kv_cache']:,} "
            f"| {result['generated_tokens_per_s'] / baseline['generated_tokens_per_s']:.2f}x |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
