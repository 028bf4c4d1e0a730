"""TokenPackerProjector beside the original formulation of the TokenPacker projector, at the real size.

Real size: CLIP ViT-L features (1024 channels, four levels -> 4096), projector width 1024, 8 heads, LLM width 4096,
the 24x24 patch grid. The original formulation is the original repository's (`tokenpacker.testing.OriginalTokenPacker`,
the formula the conversion verifies against): sequence-first tensors, every region's keys gathered by reshapes and
permutes into (s*s, regions*crops, width), the computation of one `nn.MultiheadAttention` call with its default
arguments. Both sides hold the same weights and get the same inputs. A third side is this package's previous
formulation (every key and value projected, then scaled-dot-product attention), on the same parameters. Each round
times all three, one after the other in a rotating order, so that all see the same machine load. Times are medians
over the rounds, speed-ups (over the original) are medians of the rounds' ratios. Differences are max abs differences
of the outputs of the original and TokenPackerProjector; the float64 columns are each one's max abs distance, on the
first crop, to the original formulation run in float64 on the same (rounded) weights and inputs. The last column is
the ratio of their matrix-product FLOPs (torch's FlopCounterMode): the speed-up to expect where the time goes into
matrix products.

    .venv/bin/python benchmarks/projector.py [--rounds 7] [--threads 2]   # one crop: 3 x rounds
"""

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tokenpacker import TokenPackerConfig, TokenPackerProjector
from tokenpacker.testing import OriginalTokenPacker, load_original_projector

GRID, VISION, LEVELS, WIDTH, HEADS, TEXT = 24, 1024, 4, 1024, 8, 4096


def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Trained-looking weights: the original's truncated-normal(0.02) matrices, small random biases and norms."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.dim() > 1:
                parameter.copy_(noise.clamp(-2, 2) * 0.02)
            elif name.startswith("ln_") and name.endswith("weight"):
                parameter.copy_(1 + 0.1 * noise)
            else:
                parameter.copy_(0.02 * noise)
    return module


def build_pair(scale_factor: int, dtype: torch.dtype):
    config = TokenPackerConfig(scale_factor=scale_factor)
    original = randomize(OriginalTokenPacker(VISION, LEVELS, WIDTH, HEADS, TEXT, scale_factor, GRID), 0)
    ours = load_original_projector(TokenPackerProjector(config), original)
    return original.to(dtype).eval(), ours.to(dtype).eval()


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def per_key_projection_forward(projector: TokenPackerProjector, patch_features, multi_level_features):
    """This package's projector before its attention went through the query (commit ab306ec): every key and value of
    every region projected, then one scaled-dot-product attention call. Same parameters."""
    attention, crops = projector.attention, patch_features.shape[0]
    queries = projector.query_norm(projector.query_proj(projector.coarse_queries(patch_features)))
    keys = projector.regions(projector.key_norm(projector.key_proj(multi_level_features)))
    values = projector.regions(projector.value_norm(projector.value_proj(multi_level_features)))
    regions, size, width = keys.shape
    heads, head_dim = attention.num_heads, attention.head_dim
    query = attention.q_proj(queries.reshape(regions, 1, width)).view(regions, 1, heads, head_dim).transpose(1, 2)
    key = F.linear(keys, attention.k_proj.weight, attention.k_proj.bias).view(regions, size, heads, head_dim)
    value = F.linear(values, attention.v_proj.weight, attention.v_proj.bias).view(regions, size, heads, head_dim)
    attended = F.scaled_dot_product_attention(query, key.transpose(1, 2), value.transpose(1, 2))
    packed = attention.out_proj(attended.reshape(regions, width))
    return projector.output_proj(packed.view(crops, -1, width))


def measure(functions, rounds):
    """Median seconds of each function and the median of the rounds' speed-ups of each over the first."""
    for function in functions:  # warm-up
        function()
    times = [[] for _ in functions]
    for round_index in range(rounds):
        shift = round_index % len(functions)  # rotating order: every side sees the same machine load
        for index in [*range(shift, len(functions)), *range(shift)]:
            times[index].append(timed(functions[index]))
    medians = [statistics.median(side) for side in times]
    speedups = [statistics.median(a / b for a, b in zip(times[0], side)) for side in times]
    return medians, speedups


def flop_ratio(original, ours) -> float:
    """Matrix-product FLOPs of the original over ours, for one crop (both grow linearly with the crops)."""
    inputs = torch.randn(1, GRID * GRID, VISION), torch.randn(1, GRID * GRID, VISION * LEVELS)
    counts = []
    for module in (original, ours):
        parameter = next(module.parameters())
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            module(*(tensor.to(parameter.dtype) for tensor in inputs))
        counts.append(counter.get_total_flops())
    return counts[0] / counts[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per setting (3x that for one crop)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="crops per call")
    parser.add_argument("--scale-factors", type=int, nargs="+", default=[2, 3, 4])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print()
    print("| dtype | s (tokens) | crops | original (ms) | TokenPackerProjector (ms) | speed-up "
          "| per-key projections (ms) | its speed-up | max abs diff | float64 error: original | float64 error: ours "
          "| max abs output | FLOPs original / ours |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for scale_factor in args.scale_factors:
            original, ours = build_pair(scale_factor, dtype)
            exact = copy.deepcopy(original).double()  # the same (rounded) weights in float64
            flops = flop_ratio(original, ours)
            for crops in args.batches:
                x = torch.randn(crops, GRID * GRID, VISION).to(dtype)
                x_multi = torch.randn(crops, GRID * GRID, VISION * LEVELS).to(dtype)
                with torch.inference_mode():
                    expected = exact(x[:1].double(), x_multi[:1].double())  # crops are independent
                    original_out, ours_out = original(x, x_multi), ours(x, x_multi)
                    difference = (ours_out - original_out).abs().max().item()
                    original_error = (original_out[:1].double() - expected).abs().max().item()
                    ours_error = (ours_out[:1].double() - expected).abs().max().item()
                    rounds = args.rounds * (3 if crops == 1 else 1)
                    functions = (
                        lambda: original(x, x_multi),
                        lambda: ours(x, x_multi),
                        lambda: per_key_projection_forward(ours, x, x_multi),
                    )
                    (original_s, ours_s, previous_s), (_, speedup, previous_speedup) = measure(functions, rounds)
                tokens = (GRID // scale_factor) ** 2
                print(
                    f"| {str(dtype).removeprefix('torch.')} | {scale_factor} ({tokens}) | {crops} | "
                    f"{original_s * 1e3:.1f} | {ours_s * 1e3:.1f} | {speedup:.2f}x | {previous_s * 1e3:.1f} | "
                    f"{previous_speedup:.2f}x | {difference:.1e} | "
                    f"{original_error:.1e} | {ours_error:.1e} | {expected.abs().max().item():.2f} | {flops:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
