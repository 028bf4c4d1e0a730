"""The README.md (model card) of a converted checkpoint."""

from ..configuration import TokenPackerConfig

# The Vicuna v1.5 models the released TokenPacker checkpoints start from, by (hidden size, layers).
VICUNA_BY_SHAPE = {(4096, 32): "lmsys/vicuna-7b-v1.5", (5120, 40): "lmsys/vicuna-13b-v1.5"}

CITATION = """@misc{TokenPacker,
  title={TokenPacker: Efficient Visual Projector for Multimodal LLM},
  author={Wentong Li, Yuqian Yuan, Jian Liu, Dongqi Tang, Song Wang, Jianke Zhu and Lei Zhang},
  year={2024},
  eprint={2407.02392},
  archivePrefix={arXiv},
  primaryClass={cs.CV}
}"""


def base_models(config: TokenPackerConfig, vision_model_id: str | None) -> list[str]:
    text = config.text_config
    language_model = VICUNA_BY_SHAPE.get((text.hidden_size, text.num_hidden_layers))
    return [model for model in (language_model, vision_model_id) if model]


def model_card(
    config: TokenPackerConfig,
    *,
    model_id: str,
    source_name: str,
    vision_model_id: str | None,
    command: str,
    license: str,
    verification: str | None,
) -> str:
    """Markdown with Hub metadata: what the checkpoint is, how to load it, how it was made and checked."""
    bases = base_models(config, vision_model_id)
    metadata = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text", f"license: {license}"]
    if bases:
        metadata += ["base_model:"] + [f"- {model}" for model in bases]
    metadata += ["tags:", "- tokenpacker", "- llava", "- vision-language", "- multimodal", "- arxiv:2407.02392", "---"]

    tokens = config.num_image_tokens
    grid = config.patch_grid_size
    if config.image_aspect_ratio == "slice":
        layout = (
            f"TokenPacker-HD: an image is cut into a grid of up to {config.max_slices} crops of "
            f"{config.vision_config.image_size} pixels (chosen by its aspect ratio) plus a thumbnail; every crop "
            "becomes "
            f"{tokens} tokens, with ',' between the crops of a row and '\\n' after each row, as in the original."
        )
    else:
        layout = (
            f"Each image is padded to a square and resized to {config.vision_config.image_size} pixels (LLaVA-1.5), "
            f"then packed into {tokens} tokens."
        )
    verification_section = (
        ["", "Verification printed by the conversion:", "", "```text", verification, "```"] if verification else []
    )
    body = [
        "",
        f"# {model_id}",
        "",
        "[TokenPacker](https://arxiv.org/abs/2407.02392) is a visual projector for multimodal language models: it "
        "packs "
        f"the {grid}x{grid} patch features of a CLIP crop into {tokens} tokens ({config.query_grid_size}x"
        f"{config.query_grid_size}) with coarse point queries that attend to the multi-level features of their own "
        "region (region-to-point attention). This is the LLaVA-1.5 model trained with it, converted to safetensors for "
        "transformers.",
        "",
        layout,
        "",
        f"Converted from the original checkpoint `{source_name}` (LLaVA folder layout, vision tower from the stock "
        "CLIP "
        "checkpoint). The weights are unchanged; the embeddings and the head gained rows for the `<image>` and "
        "`<pad>` tokens (the mean of the original rows plus small seeded noise, so that the two differ), which "
        "generation never emits (`suppress_tokens`).",
        "",
        "## Use",
        "",
        "```python",
        "import torch",
        "from PIL import Image",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        "",
        "model = AutoModelForImageTextToText.from_pretrained(",
        f'    "{model_id}", trust_remote_code=True, dtype=torch.float16',
        ")",
        f'processor = AutoProcessor.from_pretrained("{model_id}", trust_remote_code=True)',
        "",
        'question = {"type": "text", "text": "What is in the image?"}',
        'messages = [{"role": "user", "content": [{"type": "image"}, question]}]',
        "prompt = processor.apply_chat_template(messages, add_generation_prompt=True)",
        'inputs = processor(images=Image.open("photo.jpg"), text=prompt).to(model.device)',
        "output = model.generate(**inputs, max_new_tokens=128, do_sample=False)",
        "print(processor.post_process_image_text_to_text(output)[0])",
        "```",
        "",
        "## Configuration",
        "",
        "| field | value |",
        "|---|---|",
        f"| `scale_factor` | {config.scale_factor} ({tokens} tokens per crop) |",
        f"| `image_aspect_ratio` | `{config.image_aspect_ratio}` |",
        f"| `max_slices` | {config.max_slices} |",
        f"| `vision_feature_layer` | {config.vision_feature_layer} |",
        f"| `multi_level_feature_layers` | {config.multi_level_feature_layers} |",
        f"| `image_token_id` | {config.image_token_id} |",
        f"| `slice_separator_token_id`, `row_separator_token_id` | {config.slice_separator_token_id}, "
        f"{config.row_separator_token_id} |",
        "",
        "## Conversion",
        "",
        "```bash",
        command,
        "```",
        *verification_section,
        "",
        "## Citation",
        "",
        "```bibtex",
        CITATION,
        "```",
        "",
    ]
    return "\n".join(metadata + body)


__all__ = ["model_card"]
