"""Independent reference of the original TokenPacker projector, written from the paper's description.

It keeps the original parameter names (q_proj_1, k_proj_1, ln_q_1, clip_attn, mlp...) and computes the
region-to-point attention the original way: sequence-first `nn.MultiheadAttention`, every region of every image
one batch entry, its s*s keys gathered explicitly.
"""

import torch
import torch.nn.functional as F
from torch import nn


class OriginalTokenPacker(nn.Module):
    def __init__(self, vision_size=1024, levels=4, width=1024, heads=8, text_size=4096, scale_factor=2, grid=24):
        super().__init__()
        self.scale_factor, self.grid = scale_factor, grid
        self.q_proj_1 = nn.Linear(vision_size, width, bias=False)
        self.k_proj_1 = nn.Sequential(nn.Linear(vision_size * levels, width), nn.GELU(), nn.Linear(width, width))
        self.v_proj_1 = nn.Sequential(nn.Linear(vision_size * levels, width), nn.GELU(), nn.Linear(width, width))
        self.ln_q_1 = nn.LayerNorm(width, eps=1e-6)
        self.ln_k_1 = nn.LayerNorm(width, eps=1e-6)
        self.ln_v_1 = nn.LayerNorm(width, eps=1e-6)
        self.clip_attn = nn.MultiheadAttention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, text_size), nn.GELU(), nn.Linear(text_size, text_size))

    def randomize(self, seed=0):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
        return self

    def forward(self, x, x_multi):
        batch, tokens, _ = x.shape
        s, grid = self.scale_factor, self.grid
        coarse = grid // s
        key = self.ln_k_1(self.k_proj_1(x_multi))  # (B, grid*grid, width)
        value = self.ln_v_1(self.v_proj_1(x_multi))
        q = x.reshape(batch, grid, grid, -1).float().permute(0, 3, 1, 2)
        q = F.interpolate(q, size=(coarse, coarse), mode="bilinear", align_corners=False)
        q = q.permute(0, 2, 3, 1).reshape(batch, coarse * coarse, -1).to(x.dtype)
        query = self.ln_q_1(self.q_proj_1(q))  # (B, coarse*coarse, width)

        # One batch entry per (region row i, region column j, image n), in that order; its s*s keys row-major.
        region_queries, region_keys, region_values = [], [], []
        for i in range(coarse):
            for j in range(coarse):
                members = [(i * s + a) * grid + (j * s + b) for a in range(s) for b in range(s)]
                for n in range(batch):
                    region_queries.append(query[n, i * coarse + j][None])
                    region_keys.append(key[n, members])
                    region_values.append(value[n, members])
        q_seq = torch.stack(region_queries, dim=1)  # (1, regions*B, width)
        k_seq = torch.stack(region_keys, dim=1)  # (s*s, regions*B, width)
        v_seq = torch.stack(region_values, dim=1)
        out = self.clip_attn(q_seq, k_seq, v_seq)[0]  # (1, regions*B, width)
        out = out.reshape(coarse * coarse, batch, -1).permute(1, 0, 2)
        return self.mlp(out)


def load_original_projector(projector, original):
    """Copy an OriginalTokenPacker's weights into a TokenPackerProjector, name by name."""
    src = original.state_dict()
    in_proj_w = src["clip_attn.in_proj_weight"].chunk(3)
    in_proj_b = src["clip_attn.in_proj_bias"].chunk(3)
    state = {
        "query_proj.weight": src["q_proj_1.weight"],
        "query_norm.weight": src["ln_q_1.weight"],
        "query_norm.bias": src["ln_q_1.bias"],
        "attention.q_proj.weight": in_proj_w[0],
        "attention.q_proj.bias": in_proj_b[0],
        "attention.k_proj.weight": in_proj_w[1],
        "attention.k_proj.bias": in_proj_b[1],
        "attention.v_proj.weight": in_proj_w[2],
        "attention.v_proj.bias": in_proj_b[2],
        "attention.out_proj.weight": src["clip_attn.out_proj.weight"],
        "attention.out_proj.bias": src["clip_attn.out_proj.bias"],
    }
    for ours, theirs in (("key", "k"), ("value", "v")):
        for index, linear in ((0, "linear_1"), (2, "linear_2")):
            for kind in ("weight", "bias"):
                state[f"{ours}_proj.{linear}.{kind}"] = src[f"{theirs}_proj_1.{index}.{kind}"]
        state[f"{ours}_norm.weight"] = src[f"ln_{theirs}_1.weight"]
        state[f"{ours}_norm.bias"] = src[f"ln_{theirs}_1.bias"]
    for index, linear in ((0, "linear_1"), (2, "linear_2")):
        for kind in ("weight", "bias"):
            state[f"output_proj.{linear}.{kind}"] = src[f"mlp.{index}.{kind}"]
    projector.load_state_dict(state, strict=True)
    return projector
