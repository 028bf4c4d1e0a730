"""TokenPackerForConditionalGeneration beside transformers' LlavaForConditionalGeneration: one image, one prompt.

Both models hold the same CLIP ViT-L/14-336 tower and the same Llama language model (hidden 4096, vocab 32000 plus
the `<image>` token, random weights; shortened to a few layers by default, the real 7B depth with --full). They share
the weight tensors, so only the projectors differ: LLaVA-1.5's MLP (576 image tokens) and TokenPacker's projector with
scale factors 2, 3, 4 (144, 64, 36 tokens); TokenPacker's tower runs 23 of the 24 layers, the last one being unused.
The input is one image and 32 text tokens; prefill is one forward pass that returns the cache and the last logits,
decode is greedy one-token steps on that cache. Each round runs every model once, in a rotating order; times are
medians over the rounds, time ratios are medians of the rounds' ratios to LLaVA. Peak memory is measured in one more,
untimed run per model: what prefill and decode add to the memory that holds the weights.

    .venv/bin/python benchmarks/end_to_end.py [--layers 2] [--rounds 5] [--new-tokens 16]
    python benchmarks/end_to_end.py --full   # 32 layers (Vicuna-7B depth) on a CUDA device
"""

import argparse
import ctypes
import re
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration

from tokenpacker import TokenPackerConfig, TokenPackerForConditionalGeneration, TokenPackerProjector
from tokenpacker.configuration.compat_tokenpacker import CACHE_NAME

IMAGE_TOKEN_ID = 32000
VISION = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=336, patch_size=14, projection_dim=768,
)  # fmt: skip
TEXT = dict(
    hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
    vocab_size=32001, max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip


@dataclass
class Measurements:
    image_features: list[float] = field(default_factory=list)
    prefill: list[float] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)  # seconds per new token
    kv_cache_bytes: int = 0
    peak_bytes: int = 0


class PeakMemory:
    """Peak memory above the starting point: the CUDA allocator's peak, or the process's peak resident set (Linux).

    On CPU, glibc is first told to return every freed block of 64 KiB or more to the system at once, so that the
    resident set follows the live tensors; that slows allocations down, so it is only used in untimed runs.
    """

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cpu":
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
            libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD
            libc.malloc_trim(0)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # resets the peak resident set size to the current one
            self.start = self._status_bytes("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self.peak = self._status_bytes("VmHWM") - self.start

    @staticmethod
    def _status_bytes(key: str) -> int:
        with open("/proc/self/status") as status:
            return int(re.search(rf"{key}:\s+(\d+) kB", status.read()).group(1)) * 1024


def build_models(layers: int, dtype: torch.dtype, device: torch.device):
    """LLaVA-1.5 and TokenPacker (s = 2, 3, 4), sharing the tower and language model tensors."""
    text = dict(TEXT, num_hidden_layers=layers)
    llava_config = LlavaConfig(vision_config=dict(VISION), text_config=dict(text), image_token_index=IMAGE_TOKEN_ID)
    with torch.device(device):
        llava = LlavaForConditionalGeneration._from_config(llava_config, dtype=dtype).eval()
    models = {"LLaVA-1.5 MLP": llava}
    shared_projector = None
    for scale_factor in (2, 3, 4):
        config = TokenPackerConfig(
            vision_config=dict(VISION), text_config=dict(text), image_token_id=IMAGE_TOKEN_ID, scale_factor=scale_factor
        )
        with torch.device("meta"):
            model = TokenPackerForConditionalGeneration(config)
        if shared_projector is None:
            with torch.device(device):
                shared_projector = TokenPackerProjector(config).to(dtype)
        share_weights(model, llava, shared_projector)
        models[f"TokenPacker s={scale_factor}"] = model.eval()
    return models


def share_weights(model: TokenPackerForConditionalGeneration, llava: LlavaForConditionalGeneration, projector):
    """Gives `model` LLaVA's tower (its first 23 layers), language model and head, and `projector`'s tensors."""
    share_tensors(model.model.vision_tower, llava.model.vision_tower)
    share_tensors(model.model.language_model, llava.model.language_model)
    share_tensors(model.lm_head, llava.lm_head)
    share_tensors(model.model.multi_modal_projector, projector)


def share_tensors(target: nn.Module, source: nn.Module):
    """Makes every parameter and buffer of `target` the tensor of the same name in `source` (no copy)."""
    tensors = dict(source.named_parameters()) | dict(source.named_buffers())
    for name, _ in [*target.named_parameters(), *target.named_buffers()]:
        module_name, _, attribute = name.rpartition(".")
        setattr(target.get_submodule(module_name), attribute, tensors[name])


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_bytes(cache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def generate(model, input_ids, pixel_values, new_tokens, device):
    """Prefill (the cache and the last logits), then greedy one-token decode steps on the cache.

    Returns the prefill's seconds, the decode steps' seconds and the KV cache bytes after prefill.
    """
    synchronize(device)
    start = time.perf_counter()
    out = model(input_ids=input_ids, pixel_values=pixel_values, use_cache=True, logits_to_keep=1)
    synchronize(device)
    prefilled = time.perf_counter()
    cache = out[CACHE_NAME]
    prefill_cache_bytes = cache_bytes(cache)
    for _ in range(new_tokens):
        out = model(input_ids=out.logits[:, -1:].argmax(-1), **{CACHE_NAME: cache}, use_cache=True)
    synchronize(device)
    return prefilled - start, time.perf_counter() - prefilled, prefill_cache_bytes


def timed_run(model, input_ids, pixel_values, new_tokens, device, record: Measurements):
    synchronize(device)
    start = time.perf_counter()
    if isinstance(model, LlavaForConditionalGeneration):
        model.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        )
    else:
        model.get_image_features(pixel_values=pixel_values)
    synchronize(device)
    record.image_features.append(time.perf_counter() - start)
    prefill, decode, record.kv_cache_bytes = generate(model, input_ids, pixel_values, new_tokens, device)
    record.prefill.append(prefill)
    record.decode.append(decode / new_tokens)


def prompt_ids(image_tokens: int, text_tokens: int, device) -> torch.Tensor:
    """BOS and text ids around one image: half of the text before the image, half after."""
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(3, 32000, (text_tokens - 1,), generator=generator).tolist()
    before = text_tokens // 2 - 1
    ids = [1] + text[:before] + [IMAGE_TOKEN_ID] * image_tokens + text[before:]
    return torch.tensor([ids], device=device)


def image_tokens(model) -> int:
    if isinstance(model, LlavaForConditionalGeneration):
        return model.config.image_seq_length
    return model.config.num_image_tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="language model layers (Vicuna-7B has 32)")
    parser.add_argument("--full", action="store_true", help="the real 7B depth (32 layers) on CUDA")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm-up)")
    parser.add_argument("--new-tokens", type=int, default=16, help="decode steps per round")
    parser.add_argument("--text-tokens", type=int, default=32, help="prompt tokens besides the image")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    if args.full and not torch.cuda.is_available():
        parser.error("--full builds the 7B-depth language model (about 7B parameters): it needs a CUDA device")
    layers = 32 if args.full else args.layers
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    start = time.perf_counter()
    models = build_models(layers, dtype, device)
    print(f"built in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    pixel_values = torch.randn(1, 3, 336, 336, device=device, dtype=dtype)
    inputs = {name: prompt_ids(image_tokens(model), args.text_tokens, device) for name, model in models.items()}
    records = {name: Measurements() for name in models}
    names = list(models)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, {args.dtype}, language model: {layers} layers of Vicuna-7B's shape, "
          f"{args.text_tokens} text tokens, {args.new_tokens} decode steps, {args.rounds} rounds\n")
    with torch.inference_mode():
        for round_index in range(args.rounds + 1):
            order = names[round_index % len(names) :] + names[: round_index % len(names)]
            for name in order:
                record = records[name] if round_index else Measurements()  # round 0 warms up
                timed_run(models[name], inputs[name], pixel_values, args.new_tokens, device, record)
        for name in names:  # untimed
            with PeakMemory(device) as memory:
                generate(models[name], inputs[name], pixel_values, args.new_tokens, device)
            records[name].peak_bytes = memory.peak

    baseline = records[names[0]]
    print("| model | image tokens | sequence | image features (ms) | prefill (ms) | decode (tokens/s) "
          "| KV cache after prefill (MiB) | peak memory above weights (MiB) | prefill time / LLaVA "
          "| decode tokens/s / LLaVA | KV cache / LLaVA | peak memory / LLaVA |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        record = records[name]
        prefill_ratio = statistics.median(a / b for a, b in zip(record.prefill, baseline.prefill))
        decode_ratio = statistics.median(b / a for a, b in zip(record.decode, baseline.decode))
        print(
            f"| {name} | {image_tokens(models[name])} | {inputs[name].shape[1]} | "
            f"{statistics.median(record.image_features) * 1e3:.0f} | {statistics.median(record.prefill) * 1e3:.0f} | "
            f"{1 / statistics.median(record.decode):.2f} | {record.kv_cache_bytes / 2**20:.1f} | "
            f"{record.peak_bytes / 2**20:.0f} | {prefill_ratio:.2f} | {decode_ratio:.2f} | "
            f"{record.kv_cache_bytes / baseline.kv_cache_bytes:.2f} | {record.peak_bytes / baseline.peak_bytes:.2f} |"
        )
    shared = sum(p.numel() for p in models[names[0]].parameters()) - sum(
        p.numel() for p in models[names[0]].model.multi_modal_projector.parameters()
    )
    print(f"\nshared weights: {shared / 1e9:.2f}B parameters; projectors: " + ", ".join(
        f"{name} {sum(p.numel() for p in models[name].model.multi_modal_projector.parameters()) / 1e6:.1f}M"
        for name in names[:2]
    ))


if __name__ == "__main__":
    main()
