"""Checks of a conversion: tensors against their sources, and the converted projector against the original formula."""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..configuration import TokenPackerConfig
from ..modeling import TokenPackerProjector

ORIGINAL_LAYER_NORM_EPS = 1e-6


def original_projector_formula(
    weights: dict[str, torch.Tensor],
    patch_features: torch.Tensor,
    multi_level_features: torch.Tensor,
    scale_factor: int,
    num_heads: int,
) -> torch.Tensor:
    """The original TokenPacker projector on its own weights (names as in `model.mm_projector.*`, prefix removed).

    Sequence-first tensors, regions gathered with the original's reshapes (one batch entry per region and image,
    regions row-major, images inner; the s*s keys of a region row-major) and `nn.MultiheadAttention`'s computation.
    The one implementation of the original formula: the conversion verifies against it, and `tokenpacker.testing`'s
    `OriginalTokenPacker` (the tests' and benchmarks' reference) runs it.
    patch_features: (images, grid*grid, vision); multi_level_features: (images, grid*grid, vision * levels).
    """

    def linear(x, name):
        return F.linear(x, weights[f"{name}.weight"], weights.get(f"{name}.bias"))

    def norm(x, name):
        return F.layer_norm(
            x, x.shape[-1:], weights[f"{name}.weight"], weights[f"{name}.bias"], ORIGINAL_LAYER_NORM_EPS
        )

    def two_layer(x, name):
        return linear(F.gelu(linear(x, f"{name}.0")), f"{name}.2")

    images, tokens, _ = patch_features.shape
    grid = math.isqrt(tokens)
    coarse = grid // scale_factor
    key = norm(two_layer(multi_level_features, "k_proj_1"), "ln_k_1").permute(1, 0, 2)  # (grid*grid, images, width)
    value = norm(two_layer(multi_level_features, "v_proj_1"), "ln_v_1").permute(1, 0, 2)
    width = key.shape[-1]

    patch_map = patch_features.reshape(images, grid, grid, -1).float().permute(0, 3, 1, 2)
    coarse_map = F.interpolate(patch_map, size=(coarse, coarse), mode="bilinear", align_corners=False)
    coarse_patches = coarse_map.permute(0, 2, 3, 1).reshape(images, coarse * coarse, -1).to(patch_features.dtype)
    query = norm(linear(coarse_patches, "q_proj_1"), "ln_q_1").permute(1, 0, 2)  # (coarse*coarse, images, width)

    def regions(sequence):  # (grid*grid, images, width) -> (s*s, coarse*coarse*images, width)
        s = scale_factor
        sequence = sequence.reshape(coarse, s, coarse, s, images, width).permute(1, 3, 0, 2, 4, 5)
        return sequence.reshape(s * s, coarse * coarse * images, width)

    packed = F.multi_head_attention_forward(  # what the original's nn.MultiheadAttention computes
        query.reshape(1, -1, width),
        regions(key),
        regions(value),
        embed_dim_to_check=width,
        num_heads=num_heads,
        in_proj_weight=weights["clip_attn.in_proj_weight"],
        in_proj_bias=weights["clip_attn.in_proj_bias"],
        bias_k=None,
        bias_v=None,
        add_zero_attn=False,
        dropout_p=0.0,
        out_proj_weight=weights["clip_attn.out_proj.weight"],
        out_proj_bias=weights["clip_attn.out_proj.bias"],
        training=False,
        need_weights=False,
    )[0]
    packed = packed.reshape(coarse * coarse, images, width).permute(1, 0, 2)
    return two_layer(packed, "mlp")  # (images, coarse*coarse, text hidden)


def compare_projector(
    config: TokenPackerConfig, converted: dict[str, torch.Tensor], original: dict[str, torch.Tensor], seed: int = 0
) -> tuple[float, float]:
    """Runs the converted projector (package names) and the original formula (original names) on the same random
    features in float32; returns (max |difference|, max |original output|)."""
    projector = TokenPackerProjector(config).float().eval()
    projector.load_state_dict({name: tensor.float() for name, tensor in converted.items()}, strict=True)
    original = {name: tensor.float() for name, tensor in original.items()}
    generator = torch.Generator().manual_seed(seed)
    vision, levels = config.vision_config.hidden_size, len(config.multi_level_feature_layers)
    patches = config.patch_grid_size**2
    patch_features = torch.randn(2, patches, vision, generator=generator)
    multi_level_features = torch.randn(2, patches, vision * levels, generator=generator)
    with torch.no_grad():
        ours = projector(patch_features, multi_level_features)
        reference = original_projector_formula(
            original, patch_features, multi_level_features, config.scale_factor, config.projector_num_heads
        )
    return (ours - reference).abs().max().item(), reference.abs().max().item()


def max_abs_difference(a: torch.Tensor, b: torch.Tensor, rows_per_block: int = 4096) -> float:
    """max |a - b| in float32, a block of rows at a time (embedding matrices are large)."""
    a, b = a.reshape(a.shape[0] if a.dim() else 1, -1), b.reshape(b.shape[0] if b.dim() else 1, -1)
    difference = 0.0
    for start in range(0, a.shape[0], rows_per_block):
        block = a[start : start + rows_per_block].float() - b[start : start + rows_per_block].float()
        if block.numel():
            difference = max(difference, block.abs().max().item())
    return difference


@dataclass
class GroupCheck:
    tensors: int = 0
    source_dtypes: set = field(default_factory=set)
    max_abs_difference: float = 0.0


@dataclass
class VerificationReport:
    """What verification measured; `str()` gives the printed report."""

    dtype: torch.dtype
    groups: dict[str, GroupCheck] = field(default_factory=dict)
    new_rows: tuple[str, ...] = ()
    dropped: dict[str, int] = field(default_factory=dict)
    non_finite: tuple[str, ...] = ()  # allowed tensors that are not finite after conversion
    projector_difference: float = math.nan
    projector_scale: float = math.nan

    def record(self, group: str, source_dtype: torch.dtype, difference: float):
        check = self.groups.setdefault(group, GroupCheck())
        check.tensors += 1
        check.source_dtypes.add(source_dtype)
        check.max_abs_difference = max(check.max_abs_difference, difference)

    def __str__(self) -> str:
        out = str(self.dtype).removeprefix("torch.")
        lines = [f"Verification ({out} output; every tensor equals its source cast to {out}):"]
        for group, check in self.groups.items():
            sources = ", ".join(sorted(str(dtype).removeprefix("torch.") for dtype in check.source_dtypes))
            lines.append(
                f"  {group:<15} {check.tensors:>5} tensors from {sources:<8} "
                f"max |converted - source| = {check.max_abs_difference:.3g}"
            )
        for reason, count in self.dropped.items():
            lines.append(f"  dropped {count:>5} source tensors: {reason}")
        if self.new_rows:
            lines.append(
                f"  new vocabulary rows ({', '.join(self.new_rows)}): the mean of the original rows plus seeded noise "
                "in the embeddings and the head"
            )
        if self.non_finite:
            lines.append(f"  not finite, converted as allowed: {', '.join(self.non_finite)}")
        if math.isnan(self.projector_difference):
            lines.append("  projector vs the original formula: skipped (its weights are not finite)")
        else:
            lines.append(
                f"  projector vs the original formula (nn.MultiheadAttention on the source weights): "
                f"max |difference| = {self.projector_difference:.3g} (outputs up to {self.projector_scale:.3g})"
            )
        return "\n".join(lines)


__all__ = ["VerificationReport", "compare_projector", "max_abs_difference", "original_projector_formula"]
