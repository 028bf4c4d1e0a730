"""Parameters, FLOPs and KV cache per image of TokenPacker and LLaVA-1.5 at the real 7B and 13B sizes, without weights.

Every model is built on the meta device (shapes only) and run under torch's FlopCounterMode, which counts the
matrix products (linear layers, attention, the patch convolution: 2 FLOPs per multiply-add; element-wise work is not
counted). Per image: the vision tower and the projector on every crop, and the language model's prefill of the
image's tokens plus a 32-token prompt (logits for the last position only). The KV cache is that of the image's
tokens in bfloat16. Rows:

- LLaVA-1.5: CLIP ViT-L/14-336 (all 24 layers, as the original computes them), MLP projector, 576 tokens.
- TokenPacker 'pad': this package's 23-layer tower and projector, 144, 64 or 36 tokens.
- TokenPacker-HD 'slice' on a 1344 x 1344 image: the original's grid choice for 9, 16 or 25 slices, every block and
  the thumbnail packed, plus the ',' and row-end ids of the HD layout.
- LLaVA-NeXT style: five 336-pixel crops (a 2 x 2 grid and the overview) through LLaVA's tower and MLP, 2880 tokens.

    .venv/bin/python benchmarks/analytic.py [--llm 7B] [--plot benchmarks/analytic.png]
"""

import argparse
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlavaConfig, LlavaForConditionalGeneration

from tokenpacker import TokenPackerConfig, TokenPackerForConditionalGeneration
from tokenpacker.configuration.compat_tokenpacker import CACHE_NAME
from tokenpacker.processing.image_processing_tokenpacker import select_slice_grid

TEXT_TOKENS = 32
IMAGE_TOKEN_ID = 32000
HD_SIDE = 1344
LANGUAGE_MODELS = {  # Vicuna v1.5, plus the `<image>` token
    "7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "13B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
}
TEXT_DEFAULTS = dict(model_type="llama", vocab_size=32001, max_position_embeddings=4096, rms_norm_eps=1e-5)
PAPER_TPS = {"LLaVA-1.5": 4.9, "TokenPacker 144": 24.9, "TokenPacker 64": 27.1}  # the paper, LLaVA-1.5 7B


@dataclass
class Row:
    name: str
    crops: int
    tokens: int  # language model positions taken by the image
    vision_flops: float
    projector_flops: float
    prefill_flops: float
    kv_cache_bytes: int

    @property
    def total_flops(self) -> float:
        return self.vision_flops + self.projector_flops + self.prefill_flops


def count_flops(function) -> int:
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_meta_models(text: dict):
    """LLaVA-1.5 and TokenPacker (s = 2, 3, 4) on the meta device, in bfloat16."""
    text_config = dict(TEXT_DEFAULTS, **text)
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration._from_config(
            LlavaConfig(text_config=dict(text_config), image_token_index=IMAGE_TOKEN_ID), dtype=torch.bfloat16
        )
        tokenpackers = {
            s: TokenPackerForConditionalGeneration._from_config(
                TokenPackerConfig(text_config=dict(text_config), image_token_id=IMAGE_TOKEN_ID, scale_factor=s),
                dtype=torch.bfloat16,
            )
            for s in (2, 3, 4)
        }
    return llava, tokenpackers


def language_model_cost(model, image_tokens: int) -> tuple[int, int]:
    """Prefill FLOPs of the image's tokens plus the prompt, and the KV cache bytes of the image's tokens."""
    hidden = model.config.text_config.hidden_size
    embeds = torch.zeros(1, image_tokens + TEXT_TOKENS, hidden, device="meta", dtype=torch.bfloat16)
    language_model, head = model.model.language_model, model.lm_head
    outputs = {}
    flops = count_flops(lambda: outputs.setdefault("out", language_model(inputs_embeds=embeds, use_cache=True)))
    flops += count_flops(lambda: head(embeds[:, -1:]))
    cache = getattr(outputs["out"], CACHE_NAME)
    cache_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    return flops, cache_bytes * image_tokens // (image_tokens + TEXT_TOKENS)


def hd_layout(max_slices: int, tokens_per_crop: int) -> tuple[int, int]:
    """Crops and language model positions of one 1344 x 1344 image in TokenPacker-HD's layout."""
    rows, columns = select_slice_grid(HD_SIDE, HD_SIDE, max_slices)
    blocks = rows * columns
    crops = blocks + (1 if blocks > 1 else 0)  # the thumbnail
    separators = rows * (columns - 1) + rows + (1 if blocks > 1 else 0)  # ',' within rows, row ends, thumbnail end
    return crops, crops * tokens_per_crop + separators


def rows_for(text: dict) -> tuple[list[Row], dict[str, dict[str, int]]]:
    llava, tokenpackers = build_meta_models(text)
    pixels = torch.zeros(1, 3, 336, 336, device="meta", dtype=torch.bfloat16)
    llava_vision = count_flops(lambda: llava.model.vision_tower(pixels))
    llava_features = torch.zeros(1, 576, 1024, device="meta", dtype=torch.bfloat16)
    llava_projector = count_flops(lambda: llava.model.multi_modal_projector(llava_features))
    tokenpacker_vision = count_flops(lambda: tokenpackers[2].model.vision_tower(pixels, output_hidden_states=True))
    patch_features = torch.zeros(1, 576, 1024, device="meta", dtype=torch.bfloat16)
    multi_level = torch.zeros(1, 576, 4096, device="meta", dtype=torch.bfloat16)
    projector = {
        s: count_flops(lambda m=model: m.model.multi_modal_projector(patch_features, multi_level))
        for s, model in tokenpackers.items()
    }

    def llava_row(name, crops):
        tokens = crops * 576
        prefill, cache = language_model_cost(llava, tokens)
        return Row(name, crops, tokens, crops * llava_vision, crops * llava_projector, prefill, cache)

    def tokenpacker_row(name, s, crops, tokens):
        prefill, cache = language_model_cost(tokenpackers[s], tokens)
        return Row(name, crops, tokens, crops * tokenpacker_vision, crops * projector[s], prefill, cache)

    rows = [llava_row("LLaVA-1.5", 1)]
    for s in (2, 3, 4):
        rows.append(tokenpacker_row(f"TokenPacker {tokenpackers[s].config.num_image_tokens}", s, 1,
                                    tokenpackers[s].config.num_image_tokens))  # fmt: skip
    for s, max_slices in ((2, 9), (2, 16), (2, 25), (3, 16), (4, 16)):
        crops, tokens = hd_layout(max_slices, tokenpackers[s].config.num_image_tokens)
        name = f"TokenPacker-HD {max_slices} slices, {tokenpackers[s].config.num_image_tokens}/crop"
        rows.append(tokenpacker_row(name, s, crops, tokens))
    rows.append(llava_row("LLaVA-NeXT style", 5))

    counts = {
        "LLaVA-1.5": {
            "vision tower": parameters(llava.model.vision_tower),
            "projector": parameters(llava.model.multi_modal_projector),
            "language model": parameters(llava.model.language_model) + parameters(llava.lm_head),
        },
        "TokenPacker": {
            "vision tower": parameters(tokenpackers[2].model.vision_tower),
            "projector": parameters(tokenpackers[2].model.multi_modal_projector),
            "language model": parameters(tokenpackers[2].model.language_model) + parameters(tokenpackers[2].lm_head),
        },
    }
    return rows, counts


def print_tables(results: dict[str, tuple[list[Row], dict]]):
    print("Parameters (millions; the language model includes embeddings and head)\n")
    print("| LLM | model | vision tower | projector | language model | total |")
    print("|---|---|---|---|---|---|")
    for size, (_, counts) in results.items():
        for model, parts in counts.items():
            cells = " | ".join(f"{parts[part] / 1e6:,.1f}" for part in ("vision tower", "projector", "language model"))
            print(f"| {size} | {model} | {cells} | {sum(parts.values()) / 1e6:,.1f} |")

    print(f"\nPer image: TFLOPs and KV cache (bfloat16), prefill with a {TEXT_TOKENS}-token prompt; "
          f"HD rows for a {HD_SIDE} x {HD_SIDE} image\n")
    print("| LLM | input | crops | image tokens | vision tower | projector | LLM prefill | total | total / LLaVA-1.5 "
          "| KV cache (MiB) | KV cache / LLaVA-1.5 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for size, (rows, _) in results.items():
        baseline = rows[0]
        for row in rows:
            print(
                f"| {size} | {row.name} | {row.crops} | {row.tokens} | {row.vision_flops / 1e12:.3f} | "
                f"{row.projector_flops / 1e12:.3f} | {row.prefill_flops / 1e12:.2f} | {row.total_flops / 1e12:.2f} | "
                f"{row.total_flops / baseline.total_flops:.2f} | {row.kv_cache_bytes / 2**20:.0f} | "
                f"{row.kv_cache_bytes / baseline.kv_cache_bytes:.2f} |"
            )

    if "7B" not in results:  # the paper measured throughput at 7B only
        return
    rows = {row.name: row for row in results["7B"][0]}
    baseline = rows["LLaVA-1.5"]
    print("\nNext to the paper's throughput (7B, tokens/s on one A100)\n")
    print("| input | image tokens | paper TPS | paper TPS / LLaVA-1.5 | LLaVA-1.5 / this FLOPs per image "
          "| LLaVA-1.5 / this LLM prefill FLOPs | LLaVA-1.5 / this KV cache |")
    print("|---|---|---|---|---|---|---|")
    for name, tps in PAPER_TPS.items():
        row = rows[name]
        print(
            f"| {name} | {row.tokens} | {tps} | {tps / PAPER_TPS['LLaVA-1.5']:.2f} | "
            f"{baseline.total_flops / row.total_flops:.2f} | {baseline.prefill_flops / row.prefill_flops:.2f} | "
            f"{baseline.kv_cache_bytes / row.kv_cache_bytes:.2f} |"
        )


def plot(results: dict[str, tuple[list[Row], dict]], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (flops_axis, cache_axis) = plt.subplots(1, 2, figsize=(13, 5.5))
    rows = results["7B"][0]
    labels = [f"{row.name}\n{row.crops} crop{'s' if row.crops > 1 else ''}, {row.tokens} tokens" for row in rows]
    positions = range(len(rows))
    bottom = [0.0] * len(rows)
    for part, color in (("vision_flops", "#8da0cb"), ("projector_flops", "#fc8d62"), ("prefill_flops", "#66c2a5")):
        values = [getattr(row, part) / 1e12 for row in rows]
        label = {"vision_flops": "vision tower", "projector_flops": "projector", "prefill_flops": "LLM prefill"}[part]
        flops_axis.barh(positions, values, left=bottom, color=color, label=label)
        bottom = [b + v for b, v in zip(bottom, values)]
    flops_axis.set_yticks(list(positions), labels, fontsize=8)
    flops_axis.invert_yaxis()
    flops_axis.set_xlabel("TFLOPs per image (7B)")
    flops_axis.legend(loc="lower right")
    flops_axis.set_title("Compute per image, Vicuna-7B")

    width = 0.4
    for offset, (size, color) in zip((-width / 2, width / 2), (("7B", "#66c2a5"), ("13B", "#1b9e77"))):
        values = [row.kv_cache_bytes / 2**20 for row in results[size][0]]
        cache_axis.barh([p + offset for p in positions], values, height=width, color=color, label=size)
    cache_axis.set_yticks(list(positions), labels, fontsize=8)
    cache_axis.invert_yaxis()
    cache_axis.set_xlabel("KV cache per image (MiB, bfloat16)")
    cache_axis.legend(loc="lower right")
    cache_axis.set_title("KV cache per image")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot", type=Path, help="where to write the plot (default: benchmarks/analytic.png when "
                        "matplotlib is installed: pip install -e '.[bench]')")
    parser.add_argument("--no-plot", action="store_true", help="print the tables only")
    parser.add_argument("--llm", nargs="+", choices=sorted(LANGUAGE_MODELS), default=sorted(LANGUAGE_MODELS),
                        help="the language model sizes to count (default: all)")
    args = parser.parse_args()
    matplotlib_missing = importlib.util.find_spec("matplotlib") is None
    if args.plot is not None and matplotlib_missing:
        parser.error("--plot needs matplotlib: pip install -e '.[bench]'")
    results = {size: rows_for(text) for size, text in LANGUAGE_MODELS.items() if size in args.llm}
    print_tables(results)
    if args.no_plot:
        return
    if matplotlib_missing:
        print("\nno plot: matplotlib is not installed (pip install -e '.[bench]' to draw benchmarks/analytic.png)")
        return
    path = args.plot or Path(__file__).with_name("analytic.png")
    plot(results, path)
    print(f"\nplot: {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
