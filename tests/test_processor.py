"""TokenPackerProcessor against references written from the original: sentencepiece itself for the ids, the HD layout
of TOKENPACKER.md section 3, and the Vicuna v1 prompts of the original's conversation template."""

import json

import pytest
import sentencepiece as spm
import torch
from PIL import Image
from transformers import AutoProcessor

from tokenpacker import TokenPackerProcessor

from .builders import CHAT_IMAGE_TOKEN_ID, CHAT_PAD_TOKEN_ID, tiny_processor

TOKENS = 36  # per crop: 12x12 patch grid, scale factor 2
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("processor")


@pytest.fixture(scope="module")
def pad_processor(folder):
    (folder / "pad").mkdir()
    return tiny_processor(folder / "pad", "pad")


@pytest.fixture(scope="module")
def slice_processor(folder):
    (folder / "slice").mkdir()
    return tiny_processor(folder / "slice", "slice")


@pytest.fixture(scope="module")
def pieces(folder, pad_processor):
    return spm.SentencePieceProcessor(model_file=str(folder / "pad" / "tokenizer.model"))


def reference_ids(pieces, prompt, image_layouts, bos=True):
    """The original's tokenizer_image_token with the slow LLaMA tokenizer: each chunk between images encoded on its
    own (the slow tokenizer keeps "</s>" whole as EOS and encodes the text around it separately), BOS only first."""
    ids = [pieces.bos_id()] if bos else []
    layouts = iter(image_layouts)
    for index, chunk in enumerate(prompt.split("<image>")):
        if index > 0:
            ids += next(layouts)
        for part_index, part in enumerate(chunk.split("</s>")):
            if part_index > 0:
                ids.append(pieces.eos_id())
            ids += pieces.encode(part)
    return ids


def hd_layout(h_block, w_block, separator, row_end):
    """TOKENPACKER.md section 3: rows of blocks with ',' between blocks and '\\n' after each row, then the thumbnail
    and '\\n' when there is more than one block."""
    crop = [CHAT_IMAGE_TOKEN_ID] * TOKENS
    ids = []
    for _ in range(h_block):
        row = []
        for column in range(w_block):
            row += crop + ([separator] if column < w_block - 1 else [])
        ids += row + [row_end]
    if h_block * w_block > 1:
        ids += crop + [row_end]
    return ids


def unpadded(out, row):
    return out["input_ids"][row][out["attention_mask"][row].bool()].tolist()


def image(width, height, colour=(200, 30, 30)):
    return Image.new("RGB", (width, height), colour)


def test_pad_ids_equal_the_original_tokenization_left_padded(pad_processor, pieces):
    prompts = [f"{SYSTEM} USER: <image>\nWhat colour is the square? ASSISTANT:", "USER: <image>\nhow many ASSISTANT:"]
    out = pad_processor(images=[image(60, 40), image(30, 50)], text=prompts)
    assert set(out.keys()) == {"input_ids", "attention_mask", "pixel_values"}
    assert out["pixel_values"].shape == (2, 3, 336, 336)
    crop = [CHAT_IMAGE_TOKEN_ID] * TOKENS
    expected = [reference_ids(pieces, prompt, [crop]) for prompt in prompts]
    length = max(map(len, expected))
    for row, ids in enumerate(expected):
        padding = length - len(ids)
        assert out["input_ids"][row].tolist() == [CHAT_PAD_TOKEN_ID] * padding + ids
        assert out["attention_mask"][row].tolist() == [0] * padding + [1] * len(ids)
    # The text after the image starts with the lone dummy-prefix piece, then the newline byte, as in the original.
    first = expected[0]
    after_image = first.index(CHAT_IMAGE_TOKEN_ID) + TOKENS
    assert pieces.id_to_piece(first[after_image : after_image + 2]) == ["▁", "<0x0A>"]


def test_pixel_values_are_the_image_processors_crops(pad_processor, slice_processor):
    images = [image(60, 40), image(90, 120, (10, 200, 40))]
    for processor in (pad_processor, slice_processor):
        out = processor(images=images, text="<image><image>")
        torch.testing.assert_close(out["pixel_values"], processor.image_processor(images)["pixel_values"])


def test_slice_layout_follows_each_images_grid(slice_processor, pieces):
    separator, row_end = pieces.piece_to_id(","), pieces.piece_to_id("\n")
    assert (separator, row_end) == (slice_processor.slice_separator_token_id, slice_processor.row_separator_token_id)
    assert row_end == pieces.unk_id()  # '\n' is no piece of a byte-fallback model, like LLaMA's
    images = [image(90, 120), image(60, 50), image(300, 200)]  # a tall grid, a single block, a wide grid
    grids = slice_processor.image_processor(images)["image_grids"].tolist()
    assert grids[1] == [1, 1] and grids[0][0] * grids[0][1] > 1 and grids[2][0] * grids[2][1] > 1
    prompts = ["USER: <image>\nleft <image>\nright ASSISTANT:", "USER: <image>\nred? ASSISTANT:"]
    out = slice_processor(images=images, text=prompts)

    layouts = [hd_layout(h, w, separator, row_end) for h, w in grids]
    expected = [reference_ids(pieces, prompts[0], layouts[:2]), reference_ids(pieces, prompts[1], layouts[2:])]
    length = max(map(len, expected))
    for row, ids in enumerate(expected):
        assert out["input_ids"][row].tolist() == [CHAT_PAD_TOKEN_ID] * (length - len(ids)) + ids
    crops = sum(h * w + (h * w > 1) for h, w in grids)
    assert out["pixel_values"].shape == (crops, 3, 336, 336)
    assert int((out["input_ids"] == CHAT_IMAGE_TOKEN_ID).sum()) == crops * TOKENS


def test_the_mode_can_be_chosen_per_call(pad_processor, pieces):
    out = pad_processor(images=[image(300, 200)], text="<image>", image_aspect_ratio="slice")
    grids = pad_processor.image_processor(image(300, 200), image_aspect_ratio="slice")["image_grids"]
    h_block, w_block = grids[0].tolist()
    layout = hd_layout(h_block, w_block, pieces.piece_to_id(","), pieces.piece_to_id("\n"))
    assert out["input_ids"][0].tolist() == reference_ids(pieces, "<image>", [layout])
    assert out["pixel_values"].shape[0] == h_block * w_block + 1


def test_images_per_prompt_text_only_multi_turn_and_no_bos(pad_processor, pieces):
    crop = [CHAT_IMAGE_TOKEN_ID] * TOKENS
    prompts = ["<image>\n<image>\nCompare", "USER: hi ASSISTANT: a red square</s>USER: <image>\nand now? ASSISTANT:"]
    nested = pad_processor(images=[[image(50, 50), image(40, 60)], [image(70, 30)]], text=prompts)
    flat = pad_processor(images=[image(50, 50), image(40, 60), image(70, 30)], text=prompts)
    assert torch.equal(nested["input_ids"], flat["input_ids"])
    assert unpadded(nested, 0) == reference_ids(pieces, prompts[0], [crop, crop])
    assert unpadded(nested, 1) == reference_ids(pieces, prompts[1], [crop])

    text_only = pad_processor(text="what is in this image?", add_special_tokens=False)
    assert set(text_only.keys()) == {"input_ids", "attention_mask"}
    assert text_only["input_ids"][0].tolist() == reference_ids(pieces, "what is in this image?", [], bos=False)


def test_right_padding_and_lists_on_request(pad_processor, pieces):
    prompts = ["red", "what colour is it"]
    out = pad_processor(text=prompts, padding_side="right", return_tensors=None)
    assert isinstance(out["input_ids"], list)
    short, long = (reference_ids(pieces, prompt, []) for prompt in prompts)
    assert out["input_ids"] == [short + [CHAT_PAD_TOKEN_ID] * (len(long) - len(short)), long]
    assert out["attention_mask"][0] == [1] * len(short) + [0] * (len(long) - len(short))


def test_marker_and_image_counts_must_agree(pad_processor):
    with pytest.raises(
        ValueError,
        match=r"^The prompts hold 2 <image> marker\(s\) in total \(per prompt: 1, 1\) but 1 "
        r"image\(s\) were given$",
    ):
        pad_processor(images=[image(40, 40)], text=["<image> a", "<image> b"])
    with pytest.raises(ValueError, match=r"^The prompts hold 0 <image> marker\(s\) in total \(per prompt: 0\) but 1 "):
        pad_processor(images=image(40, 40), text="no marker")
    with pytest.raises(ValueError, match=r"^The prompts hold 1 <image> marker\(s\) in total \(per prompt: 1\) but 0 "):
        pad_processor(text="<image> where is the image?")
    with pytest.raises(ValueError, match=r"^Prompt 1 holds 1 <image> marker\(s\) but 2 image\(s\) were given for it$"):
        pad_processor(images=[[image(40, 40)], [image(40, 40), image(40, 40)]], text=["<image>", "<image>"])
    with pytest.raises(ValueError, match=r"^Got 1 lists of images \(one per prompt\) but 2 prompt\(s\)$"):
        pad_processor(images=[[image(40, 40)]], text=["<image>", "b"])


def test_bad_arguments_are_refused(pad_processor):
    with pytest.raises(ValueError, match="^TokenPackerProcessor needs text: a prompt with one '<image>' per image$"):
        pad_processor(images=image(40, 40))
    with pytest.raises(TypeError, match="^text must be a string or a non-empty list of strings, got int$"):
        pad_processor(text=3)
    with pytest.raises(ValueError, match=r"^TokenPackerProcessor does not support \['truncation'\]"):
        pad_processor(text="hello", truncation=True, max_length=2)
    tokenizer, image_processor = pad_processor.tokenizer, pad_processor.image_processor
    with pytest.raises(ValueError, match="^num_image_tokens must be a positive integer, got 0$"):
        TokenPackerProcessor(image_processor, tokenizer, num_image_tokens=0)
    with pytest.raises(ValueError, match="^The tokenizer has no '<img>' token; add it as a special token$"):
        TokenPackerProcessor(image_processor, tokenizer, image_token="<img>")
    with pytest.raises(
        ValueError, match="^row_separator_token_id must be a token id below the tokenizer's 402, got 402$"
    ):
        TokenPackerProcessor(image_processor, tokenizer, slice_separator_token_id=5, row_separator_token_id=402)
    with pytest.raises(
        ValueError, match="^slice_separator_token_id must be a token id below the tokenizer's 402, got 29892$"
    ):
        TokenPackerProcessor(image_processor, tokenizer)  # the LLaMA default does not fit this vocabulary


def question(text, images=1):
    return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}


def test_chat_template_writes_the_original_vicuna_v1_prompts(pad_processor):
    render = pad_processor.apply_chat_template
    assert render([question("What is this?")], add_generation_prompt=True) == (
        f"{SYSTEM} USER: <image>\nWhat is this? ASSISTANT:"
    )
    conversation = [
        question("What is this?"),
        {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
        {"role": "user", "content": "And the circle?"},
        {"role": "assistant", "content": "It is blue."},
        {"role": "user", "content": [{"type": "text", "text": "Thanks."}]},
    ]
    assert render(conversation, add_generation_prompt=True) == (
        f"{SYSTEM} USER: <image>\nWhat is this? ASSISTANT: A red square.</s>USER: And the circle? ASSISTANT: It is "
        "blue.</s>USER: Thanks. ASSISTANT:"
    )
    # Images come before the text of their message, whatever the order of the content items.
    several = {"role": "user", "content": [{"type": "text", "text": "Compare."}, {"type": "image"}, {"type": "image"}]}
    assert render([several], add_generation_prompt=True) == f"{SYSTEM} USER: <image>\n<image>\nCompare. ASSISTANT:"
    system = {"role": "system", "content": [{"type": "text", "text": "Answer in one word."}]}
    assert render([system, question("Colour?")], add_generation_prompt=True) == (
        "Answer in one word. USER: <image>\nColour? ASSISTANT:"
    )
    assert render([question("Colour?")]) == f"{SYSTEM} USER: <image>\nColour? "


def test_chat_template_refuses_other_roles(pad_processor):
    with pytest.raises(Exception, match="got role tool"):
        pad_processor.apply_chat_template([question("hi"), {"role": "tool", "content": "x"}])


def test_tokenized_chat_equals_the_processor_on_the_rendered_prompt(slice_processor):
    pictures = [image(90, 120), image(300, 200)]
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": pictures[0]}, {"type": "text", "text": "Left?"}]},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": [{"type": "image", "image": pictures[1]}, {"type": "text", "text": "Right?"}]},
    ]
    out = slice_processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    prompt = slice_processor.apply_chat_template(conversation, add_generation_prompt=True)
    direct = slice_processor(images=pictures, text=prompt)
    assert set(out.keys()) == {"input_ids", "attention_mask", "pixel_values"}
    for key in direct:
        assert torch.equal(out[key], direct[key]), key


def test_decoding_gives_the_answer(pad_processor):
    prompt = f"{SYSTEM} USER: <image>\nWhat colour is it? ASSISTANT:"
    prompt_ids = pad_processor(images=image(40, 40), text=prompt)["input_ids"][0].tolist()
    answer_ids = pad_processor.tokenizer(" red and blue", add_special_tokens=False)["input_ids"]
    sequences = torch.tensor([prompt_ids + answer_ids + [2], [CHAT_PAD_TOKEN_ID] + prompt_ids + answer_ids])
    assert pad_processor.post_process_image_text_to_text(sequences) == ["red and blue", "red and blue"]
    assert pad_processor.post_process_image_text_to_text(sequences[1]) == "red and blue"
    plain = pad_processor.tokenizer("red and blue")["input_ids"]
    assert pad_processor.post_process_image_text_to_text(plain) == "red and blue"  # no prompt: the whole text


def test_decode_and_batch_decode_give_the_whole_text_like_the_tokenizer(pad_processor):
    prompt = f"{SYSTEM} USER: <image>\nWhat colour is it? ASSISTANT:"
    prompt_ids = pad_processor(images=image(40, 40), text=prompt)["input_ids"][0].tolist()
    answer_ids = pad_processor.tokenizer(" red and blue", add_special_tokens=False)["input_ids"]
    sequences = torch.tensor([prompt_ids + answer_ids + [2], [CHAT_PAD_TOKEN_ID] + prompt_ids + answer_ids])
    texts = pad_processor.batch_decode(sequences, skip_special_tokens=True)
    assert texts == pad_processor.tokenizer.batch_decode(sequences, skip_special_tokens=True)
    for text in texts:  # the prompt stays: the answer is post_process_image_text_to_text's job
        assert text.startswith(f"{SYSTEM} USER:") and text.endswith("ASSISTANT:  red and blue")
    assert pad_processor.decode(sequences[0], skip_special_tokens=True) == texts[0]
    assert pad_processor.decode(sequences[0]).startswith("<s>")  # special tokens kept unless asked, as in transformers


def test_save_and_load_round_trip(pad_processor, slice_processor, tmp_path):
    for name, processor in (("pad", pad_processor), ("slice", slice_processor)):
        processor.save_pretrained(tmp_path / name)
        settings = json.loads((tmp_path / name / "processor_config.json").read_text())
        assert {key: settings[key] for key in ("image_token", "num_image_tokens")} == {
            "image_token": "<image>",
            "num_image_tokens": TOKENS,
        }
        assert settings["slice_separator_token_id"] == processor.slice_separator_token_id
        assert settings["row_separator_token_id"] == processor.row_separator_token_id
        assert settings["image_processor"]["image_aspect_ratio"] == name
        loaded = AutoProcessor.from_pretrained(tmp_path / name)
        assert type(loaded) is TokenPackerProcessor
        assert loaded.chat_template == processor.chat_template
        assert loaded.tokenizer.padding_side == "left"
        pictures, prompt = [image(90, 120), image(60, 40)], ["<image>\nleft", "USER: <image>\nright ASSISTANT:"]
        expected, got = processor(images=pictures, text=prompt), loaded(images=pictures, text=prompt)
        for key in expected:
            assert torch.equal(expected[key], got[key]), key


def test_num_multimodal_tokens_are_each_images_crops_and_placeholder_run(pad_processor, slice_processor):
    sizes = [(40, 40), (400, 700), (1000, 300), (336, 1344)]
    for processor in (pad_processor, slice_processor):
        data = processor._get_num_multimodal_tokens(image_sizes=sizes)
        for (height, width), num_tokens, num_crops in zip(sizes, data.num_image_tokens, data.num_image_patches):
            out = processor(images=image(width, height), text="<image>", add_special_tokens=False, return_tensors=None)
            h_block, w_block = processor.image_processor(image(width, height))["image_grids"][0].tolist()
            per_crop, blocks = processor.num_image_tokens, h_block * w_block
            # TOKENPACKER.md section 3: blocks, ',' between the blocks of a row, '\n' after each row, thumbnail + '\n'
            expected = per_crop if processor.image_processor.image_aspect_ratio == "pad" else (
                blocks * per_crop + h_block * w_block + (per_crop + 1 if blocks > 1 else 0)
            )
            assert num_tokens == expected == len(out["input_ids"][0])  # the whole run the `<image>` became
            assert num_crops == len(out["pixel_values"]) == (1 if blocks == 1 else blocks + 1)
    assert "num_image_tokens" not in pad_processor._get_num_multimodal_tokens()


def test_truncation_off_is_accepted_and_on_is_refused(pad_processor):
    prompt = f"{SYSTEM} USER: <image>\nWhat is it? ASSISTANT:"
    plain = pad_processor(images=image(40, 40), text=prompt)
    for truncation in (False, None):
        out = pad_processor(images=image(40, 40), text=prompt, truncation=truncation)
        assert torch.equal(out["input_ids"], plain["input_ids"])
    with pytest.raises(ValueError, match="does not support \\['truncation'\\]"):
        pad_processor(images=image(40, 40), text=prompt, truncation=True)
