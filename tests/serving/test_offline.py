"""vLLM's offline engine with the TokenPacker plugin: the same prompt ids and greedy answers as transformers."""

from tokenpacker import TokenPackerProcessor
from tokenpacker.shapes import PRETRAINED, render_scene

from .helpers import assert_served_like_transformers, run_vllm_greedy, slice_model, transformers_greedy


def prompt(question: str) -> str:
    """The Vicuna v1 prompt of one question about one image, as the model's chat template renders it."""
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return TokenPackerProcessor.from_pretrained(PRETRAINED).apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=False
    )


def scene_requests(tmp_path, sizes: list[tuple[int, int] | None]) -> list[dict]:
    """One request per (width, height): a tiny-shapes test scene resized to it (None: as drawn), asking for the
    colour."""
    requests = []
    for index, size in enumerate(sizes):
        path = tmp_path / f"scene-{index}.png"
        image = render_scene("test", index).image
        (image if size is None else image.resize(size)).save(path)
        requests.append({"prompt": prompt("What colour is the shape?"), "images": [str(path)], "max_tokens": 12})
    return requests


def test_pad_greedy_ids_equal_transformers(tmp_path):
    requests = scene_requests(tmp_path, [None, (500, 300), (200, 420)])
    requests.append({**requests[0], "prompt": prompt("Where is the shape?")})

    served = run_vllm_greedy(PRETRAINED, requests, tmp_path)
    reference = transformers_greedy(PRETRAINED, requests)

    assert_served_like_transformers(served, reference)
    # The shipped model learned scenes of every size and aspect ratio: on one as drawn (409x868) its answers are right.
    scene = render_scene("test", 0)
    assert scene.image.size == (409, 868)
    assert [served[0]["text"].strip(), served[3]["text"].strip()] == [scene.colour, scene.position]


def test_slice_greedy_ids_equal_transformers_across_grids(tmp_path):
    model_dir = slice_model(tmp_path)
    # (width, height) -> grids of (rows, columns) 1x1, 2x1, 1x3 and 3x3 with at most 9 blocks
    requests = scene_requests(tmp_path, [(336, 336), (336, 672), (1008, 336), (1008, 1008)])
    processor = TokenPackerProcessor.from_pretrained(model_dir)
    grids = [
        processor.image_processor(render_scene("test", 0).image.resize(size))["image_grids"][0].tolist()
        for size in [(336, 336), (336, 672), (1008, 336), (1008, 1008)]
    ]
    assert grids == [[1, 1], [2, 1], [1, 3], [3, 3]]

    served = run_vllm_greedy(model_dir, requests, tmp_path)
    reference = transformers_greedy(model_dir, requests)

    assert_served_like_transformers(served, reference)
    # HD layout of a 1x3 grid written out: three blocks with ',' between them, the row end, the thumbnail, the row end.
    crop = [processor.image_token_id] * processor.num_image_tokens
    comma, row_end = processor.slice_separator_token_id, processor.row_separator_token_id
    layout = crop + [comma] + crop + [comma] + crop + [row_end] + crop + [row_end]
    one_by_three = served[2]["prompt_token_ids"]
    start = one_by_three.index(processor.image_token_id)
    assert one_by_three[start : start + len(layout)] == layout
    assert one_by_three.count(processor.image_token_id) == 4 * processor.num_image_tokens
