"""vLLM on converted original-layout checkpoints, whose tokenizer comes from a LLaMA-style sentencepiece model (BPE,
byte fallback): vLLM tokenizes the prompt as one string, and its ids must still be the original's chunked ones."""

import numpy as np
import pytest
import sentencepiece as spm
from PIL import Image

from tokenpacker import TokenPackerProcessor
from tokenpacker.conversion import convert_checkpoint

from ..original_checkpoints import write_original_release
from .helpers import assert_served_like_transformers, run_vllm_greedy, transformers_greedy

# vLLM's CPU attention takes head sizes of 32 and more: 2 heads of 32 on the fixture's 64-wide Llama.
WIDE_HEADS = dict(num_attention_heads=2, num_key_value_heads=2)


def converted_release(root, image_aspect_ratio: str):
    """An original release ("slice": 9 patches) converted with the package's converter: (release, converted folder)."""
    patch_num = 9 if image_aspect_ratio == "slice" else None
    release = write_original_release(
        root, image_aspect_ratio=image_aspect_ratio, patch_num=patch_num, shards=1, text_sizes=WIDE_HEADS
    )
    output = convert_checkpoint(release.checkpoint, root / "converted", vision_tower=release.vision_tower).output
    return release, output


def original_prompt_ids(pieces, prompt: str, image_layouts: list[list[int]]) -> list[int]:
    """The original's tokenizer_image_token with the slow LLaMA tokenizer: BOS, then each chunk between `<image>`
    markers encoded on its own, each image's ids in place of its marker."""
    ids = [pieces.bos_id()]
    layouts = iter(image_layouts)
    for index, chunk in enumerate(prompt.split("<image>")):
        if index > 0:
            ids += next(layouts)
        ids += pieces.encode(chunk)
    return ids


@pytest.mark.parametrize("image_aspect_ratio", ["pad", "slice"])
def test_prompt_and_greedy_ids_equal_the_original_chunked_ids(tmp_path, image_aspect_ratio):
    release, model_dir = converted_release(tmp_path / "release", image_aspect_ratio)
    processor = TokenPackerProcessor.from_pretrained(model_dir)
    pieces = spm.SentencePieceProcessor(model_file=str(release.checkpoint / "tokenizer.model"))
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("USER: <image>\nWhat is this? ASSISTANT:")
    rng = np.random.default_rng(0)
    requests = []
    for index, (width, height) in enumerate([(336, 336), (700, 300)]):  # "slice": grids 1x1 and 1x2 (+ thumbnail)
        path = tmp_path / f"image-{index}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        requests.append({"prompt": prompt, "images": [str(path)], "max_tokens": 8})

    served = run_vllm_greedy(model_dir, requests, tmp_path)
    reference = transformers_greedy(model_dir, requests)

    grids = [processor.image_processor(Image.open(r["images"][0]))["image_grids"][0].tolist() for r in requests]
    assert grids == ([[1, 1], [1, 1]] if image_aspect_ratio == "pad" else [[1, 1], [1, 2]])
    image_token_id = processor.image_token_id
    for grid, got in zip(grids, served, strict=True):
        layout = processor.image_token_layout(*grid, image_aspect_ratio)
        assert got["prompt_token_ids"] == original_prompt_ids(pieces, prompt, [layout])
        # After the image, the chunk "\nWhat ..." starts with sentencepiece's lone dummy prefix, then the '\n' byte.
        after_image = got["prompt_token_ids"][got["prompt_token_ids"].index(image_token_id) + len(layout) :]
        assert after_image[:2] == [pieces.piece_to_id("▁"), pieces.piece_to_id("<0x0A>")]
    assert_served_like_transformers(served, reference)
