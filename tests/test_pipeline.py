"""pipeline("image-text-to-text") on a saved folder: everything loaded by the pipeline, answers equal to `generate`
on the prompt written out by hand."""

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, pipeline

from tokenpacker import TokenPackerForConditionalGeneration, TokenPackerImageProcessor, TokenPackerProcessor

from .builders import CHAT_IMAGE_TOKEN_ID, CHAT_PAD_TOKEN_ID, tiny_checkpoint_folder

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
NEW_TOKENS = 6


@pytest.fixture(scope="module", params=["pad", "slice"])
def folder(request, tmp_path_factory):
    folder = tiny_checkpoint_folder(tmp_path_factory.mktemp(request.param), request.param)
    # Loud image features, so that a random model's answer depends on its image and a mix-up of images would show.
    model = TokenPackerForConditionalGeneration.from_pretrained(folder)
    with torch.no_grad():
        model.model.multi_modal_projector.output_proj.linear_2.weight.mul_(50)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def answerer(folder):
    return pipeline("image-text-to-text", model=str(folder))


def picture(width, height, colour):
    return Image.new("RGB", (width, height), colour)


def chat(image, question):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def loaded(folder):
    return TokenPackerForConditionalGeneration.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


def generated_answer(loaded, image, question):
    """The answer the plain way: the Vicuna v1 prompt by hand, the processor, `generate`, the new tokens decoded."""
    model, processor = loaded
    inputs = processor(images=image, text=f"{SYSTEM} USER: <image>\n{question} ASSISTANT:")
    with torch.no_grad():
        sequences = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    new_tokens = sequences[0, inputs["input_ids"].shape[1] :]
    assert len(new_tokens) > 0
    assert CHAT_IMAGE_TOKEN_ID not in new_tokens.tolist() and CHAT_PAD_TOKEN_ID not in new_tokens.tolist()
    return processor.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def test_the_pipeline_loads_everything_from_the_folder(answerer):
    assert type(answerer.model) is TokenPackerForConditionalGeneration
    assert type(answerer.processor) is TokenPackerProcessor
    assert type(answerer.processor.image_processor) is TokenPackerImageProcessor
    assert answerer.processor.image_processor.image_aspect_ratio == answerer.model.config.image_aspect_ratio
    assert answerer.tokenizer.padding_side == "left"


def test_chat_answer_equals_generate(answerer, loaded):
    image, question = picture(300, 200, (200, 40, 40)), "What colour is the square?"
    messages = chat(image, question)
    (result,) = answerer(text=messages, max_new_tokens=NEW_TOKENS)
    expected = generated_answer(loaded, image, question)
    assert result["input_text"] == messages
    assert result["generated_text"] == messages + [{"role": "assistant", "content": expected}]
    (short,) = answerer(text=messages, max_new_tokens=NEW_TOKENS, return_full_text=False)
    assert short["generated_text"] == expected


def test_batched_chats_with_images_of_different_sizes(answerer):
    images = [picture(90, 120, (255, 255, 255)), picture(300, 200, (0, 0, 0)), picture(60, 50, (255, 0, 0))]
    questions = ["What is on the left?", "What is on the left?", "And what is on the right of the green square?"]
    chats = [
        chat(image, question) for image, question in zip(images, questions, strict=True)
    ]  # prompts of different lengths
    one_by_one = [answerer(text=messages, max_new_tokens=NEW_TOKENS, return_full_text=False) for messages in chats]
    one_by_one = [result[0]["generated_text"] for result in one_by_one]
    assert one_by_one[0] != one_by_one[1]  # same question: the answers tell the images apart
    batched = answerer(text=chats, max_new_tokens=NEW_TOKENS, return_full_text=False, batch_size=3)
    assert [result[0]["generated_text"] for result in batched] == one_by_one


def test_images_and_text_prompts(answerer, loaded):
    images = [picture(90, 120, (255, 255, 255)), picture(300, 200, (0, 0, 0))]
    questions = ["What is on the left?", "What is on the left?"]
    prompts = [f"{SYSTEM} USER: <image>\n{question} ASSISTANT:" for question in questions]
    results = answerer(images=images, text=prompts, max_new_tokens=NEW_TOKENS, return_full_text=False)
    expected = [generated_answer(loaded, image, question) for image, question in zip(images, questions, strict=True)]
    assert expected[0] != expected[1]
    assert [result["generated_text"] for result in results] == expected  # one left-padded batch


def test_the_images_are_encoded_once_per_answer(answerer, monkeypatch):
    model = answerer.model.model
    encoded = []
    original = model.get_image_features

    def counting(pixel_values, **kwargs):
        encoded.append(pixel_values.shape[0])
        return original(pixel_values, **kwargs)

    monkeypatch.setattr(model, "get_image_features", counting)
    answerer(text=chat(picture(300, 200, (200, 40, 40)), "What colour?"), max_new_tokens=NEW_TOKENS)
    crops = answerer.processor.image_processor(picture(300, 200, (0, 0, 0)))["pixel_values"].shape[0]
    assert encoded == [crops]  # the prefill only: pixel_values are dropped for the cached steps


def test_an_assistant_prefill_is_continued(answerer, loaded):
    image = picture(300, 200, (200, 40, 40))
    messages = chat(image, "What is it?") + [{"role": "assistant", "content": [{"type": "text", "text": "It is a"}]}]
    (result,) = answerer(text=messages, max_new_tokens=NEW_TOKENS)
    model, processor = loaded
    inputs = processor(images=image, text=f"{SYSTEM} USER: <image>\nWhat is it? ASSISTANT: It is a")
    with torch.no_grad():
        sequences = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    continued = processor.post_process_image_text_to_text(sequences)[0]
    assert continued.startswith("It is a") and len(continued) > len("It is a")
    assert result["generated_text"][-1] == {"role": "assistant", "content": [{"type": "text", "text": continued}]}
