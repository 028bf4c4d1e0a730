"""Shared references and fixtures of the tests and benchmarks (like `transformers.testing_utils`).

Independent references written from TOKENPACKER.md, never from this package's modeling or processing code: the
original projector (`OriginalTokenPacker`, its original parameter names, computed by the original formula that the
conversion also verifies against) and the original image pipelines (`reference_pad`, `reference_slice`), plus the
deterministic test image `photo`, the config of an original checkpoint (`original_llava_config`) and question files in
the original's format from held-out tiny-shapes scenes (`write_shapes_questions`). Imports no test framework; nothing
of the package imports it.
"""

import json
import pathlib
from functools import lru_cache

import numpy as np
import PIL.Image
import torch
from torch import nn
from transformers import CLIPImageProcessorPil

from .conversion.verify import original_projector_formula
from .shapes import render_scene


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@lru_cache(maxsize=None)
def photo(height, width, seed=0):
    """A deterministic RGB image with smooth gradients and noise, so that every resampling detail shows."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([xs * 255 / max(width, 1), ys * 255 / max(height, 1), (xs + ys) % 256], axis=-1)
    noisy = base + rng.normal(0, 25, size=(height, width, 3))
    return PIL.Image.fromarray(noisy.clip(0, 255).astype(np.uint8), "RGB")


# 'pad' (TOKENPACKER.md section 2): LLaVA-1.5's expand2square, then CLIP's own image processor.


def reference_expand2square(image, background):
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = PIL.Image.new(image.mode, (side, side), background)
    square.paste(image, (0, (side - height) // 2) if width > height else ((side - width) // 2, 0))
    return square


CLIP_PROCESSOR = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})


def reference_pad(image):
    background = tuple(int(m * 255) for m in CLIP_MEAN)
    square = reference_expand2square(image.convert("RGB"), background)
    return CLIP_PROCESSOR(square, return_tensors="pt")["pixel_values"]


# 'slice' (TOKENPACKER.md section 3): TokenPacker-HD's grid choice, resizes and blocks.

# The candidate grids (rows x columns) of the three tables, in order; the 25 table repeats 4x6 and 6x4.
GRID_TABLES = {
    9: "1x1 1x2 2x1 1x3 3x1 2x2 1x4 4x1 1x5 5x1 1x6 6x1 2x3 3x2 1x7 7x1 4x2 2x4 1x8 8x1 3x3 1x9 9x1",
    16: "2x5 5x2 2x6 6x2 3x4 4x3 2x7 7x2 3x5 5x3 2x8 8x2 4x4",
    25: "3x6 6x3 2x9 9x2 4x5 5x4 2x10 10x2 3x7 7x3 11x2 2x11 4x6 6x4 12x2 2x12 3x8 8x3 4x6 6x4 5x5",
}


def candidate_grids(max_slices):
    tables = [table for limit, table in GRID_TABLES.items() if limit <= max_slices]
    return [tuple(int(n) for n in grid.split("x")) for table in tables for grid in table.split()]


def reference_grids(heights, widths, max_slices, block=336):
    """Grid choice for many image sizes at once, in float32 torch arithmetic like the original."""
    grids = candidate_grids(max_slices)
    box_hw = torch.tensor(grids) * block  # (G, 2) int64
    box_area = box_hw[:, 0] * box_hw[:, 1]  # int64
    size = torch.stack([torch.as_tensor(heights), torch.as_tensor(widths)], dim=1)  # (N, 2) int64
    ratio = (box_hw[None] / size[:, None]).min(dim=-1).values  # (N, G) float32
    filled = torch.round(size[:, :1] * ratio) * torch.round(size[:, 1:] * ratio) / box_area
    enlarged = size * 1.4  # (N, 2) float32, the enlarged image box starts at the origin like every candidate
    overlap = torch.minimum(box_hw[None], enlarged[:, None]).clamp(min=0)  # (N, G, 2)
    inter = overlap[..., 0] * overlap[..., 1]
    union = box_area + (enlarged[:, 0] * enlarged[:, 1])[:, None] - inter
    score = filled + (inter / (union + 1e-5)) * 0.1
    return [grids[i] for i in score.argmax(dim=1).tolist()]


def reference_fit(height, width, target_height, target_width):
    h_ratio, w_ratio = target_height / height, target_width / width
    if h_ratio <= w_ratio:
        new_height, new_width = target_height, min(target_width, round(width * h_ratio))
    else:
        new_height, new_width = min(target_height, round(height * w_ratio)), target_width
    return max(new_height, 1), max(new_width, 1)  # never below one pixel (the original fails on such slivers)


def reference_slice(image, max_slices, block=336):
    rgb = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float().div(255)  # ToTensor
    pixels = (rgb - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]  # Normalize
    height, width = pixels.shape[-2:]
    (h_block, w_block) = reference_grids([height], [width], max_slices, block)[0]

    new_h, new_w = reference_fit(height, width, block * h_block, block * w_block)
    canvas = torch.zeros(1, 3, block * h_block, block * w_block)
    canvas[:, :, :new_h, :new_w] = torch.nn.functional.interpolate(pixels[None], size=(new_h, new_w), mode="bilinear")
    crops = []
    for row in range(h_block):
        for column in range(w_block):
            crops.append(canvas[0, :, row * block : (row + 1) * block, column * block : (column + 1) * block])
    if len(crops) > 1:
        new_h, new_w = reference_fit(height, width, block, block)  # the ORIGINAL size, applied to the canvas
        thumbnail = torch.zeros(3, block, block)
        thumbnail[:, :new_h, :new_w] = torch.nn.functional.interpolate(canvas, size=(new_h, new_w), mode="bilinear")[0]
        crops.append(thumbnail)
    return torch.stack(crops), (h_block, w_block)


class OriginalTokenPacker(nn.Module):
    """The original projector's parameters under their original names; its forward is the original formula."""

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
        """x: (images, grid*grid, vision); x_multi: (images, grid*grid, vision * levels)."""
        weights = dict(self.named_parameters())
        return original_projector_formula(weights, x, x_multi, self.scale_factor, self.clip_attn.num_heads)


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


def original_llava_config(
    text: dict,
    vision_hidden_size: int,
    image_aspect_ratio: str = "pad",
    scale_factor: int = 2,
    patch_num: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """config.json of an original TokenPacker checkpoint as LLaVA's training script saves it (LlavaConfig =
    LlamaConfig + mm_* fields, TOKENPACKER.md section 4), for the Llama sizes `text`."""
    config = {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        **text,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "transformers_version": "4.31.0",
        "freeze_mm_mlp_adapter": False,
        "image_aspect_ratio": image_aspect_ratio,
        "image_grid_pinpoints": None,
        "mm_hidden_size": vision_hidden_size,
        "mm_projector_type": "tokenpacker",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "scale_factor": scale_factor,
        "tune_mm_mlp_adapter": False,
        "use_mm_proj": True,
    }
    if patch_num is not None:
        config["patch_num"] = patch_num
    return config


def write_shapes_questions(folder, num_scenes, split="test"):
    """Every question of the first `num_scenes` tiny-shapes scenes of `split`, as a question file in the original's
    jsonl format (`folder/questions.jsonl`, images in `folder/images`). Returns {question_id: the scene's answer}."""
    folder = pathlib.Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines, answers = [], {}
    for index in range(num_scenes):
        scene = render_scene(split, index)
        image = f"{split}-{index}.png"
        scene.image.save(folder / "images" / image)
        for question, answer in scene.questions():
            answers[len(lines)] = answer
            lines.append(json.dumps({"question_id": len(lines), "image": image, "text": question}))
    (folder / "questions.jsonl").write_text("".join(line + "\n" for line in lines))
    return answers


__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "OriginalTokenPacker",
    "load_original_projector",
    "original_llava_config",
    "original_projector_formula",
    "photo",
    "reference_grids",
    "reference_pad",
    "reference_slice",
    "write_shapes_questions",
]
