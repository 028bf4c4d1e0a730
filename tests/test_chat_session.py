"""`ChatSession`: streamed answers equal `generate`'s, the original's Vicuna v1 history, image and reset, errors."""

import threading

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from tokenpacker.chat_session import ChatSession, describe_image
from tokenpacker.demo import build_demo_checkpoint
from tokenpacker.shapes import PRETRAINED, QUESTIONS, render_scene
from tokenpacker.testing import photo, reference_grids

# The original's conv_vicuna_v1 (llava/conversation.py), written out here as the reference.
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
COLOUR, POSITION = QUESTIONS["colour"], QUESTIONS["position"]


def vicuna_v1_prompt(turns: list[tuple[str, str]], question: str) -> str:
    """The original's prompt: the image with the first question, "</s>" after each answer."""
    text = SYSTEM + " "
    for number, (asked, answered) in enumerate([*turns, (question, None)]):
        text += "USER: " + ("<image>\n" if number == 0 else "") + asked + " ASSISTANT:"
        if answered is not None:
            text += " " + answered + "</s>"
    return text


@pytest.fixture(scope="module")
def shapes_model():
    return AutoModelForImageTextToText.from_pretrained(PRETRAINED).eval(), AutoProcessor.from_pretrained(PRETRAINED)


@pytest.fixture(scope="module")
def hd_folder(tmp_path_factory):
    return build_demo_checkpoint(tmp_path_factory.mktemp("chat") / "hd", hd=True)


class GenerateSpy:
    """Records the inputs of each `generate` call of `model`, then generates."""

    def __init__(self, monkeypatch, model):
        self.calls = []
        generate = model.generate

        def recorded(**kwargs):
            self.calls.append(kwargs)
            return generate(**kwargs)

        monkeypatch.setattr(model, "generate", recorded)


def greedy_answer(model, processor, image, prompt: str, max_new_tokens: int) -> str:
    """The non-streamed greedy answer to a prompt string given to the processor as trusted text."""
    inputs = processor(images=[image], text=prompt)
    generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_two_turns_stream_generates_greedy_answers_and_render_the_original_history(shapes_model, monkeypatch):
    model, processor = shapes_model
    session = ChatSession(model, processor, max_new_tokens=8)
    spy = GenerateSpy(monkeypatch, model)
    scene = render_scene("test", 7)
    info = session.set_image(scene.image)
    assert (info.size, info.num_crops, info.grid, info.num_visual_tokens) == (scene.image.size, 1, None, 36)

    first = list(session.ask(COLOUR))
    second = list(session.ask(POSITION))
    assert "".join(first) == scene.colour and "".join(second) == scene.position

    turns = [(COLOUR, scene.colour), (POSITION, scene.position)]
    for number, pieces in enumerate((first, second)):
        prompt = vicuna_v1_prompt(turns[:number], turns[number][0])
        expected = processor(images=[scene.image], text=prompt)
        assert spy.calls[number]["input_ids"].tolist() == expected["input_ids"].tolist()
        assert torch.equal(spy.calls[number]["pixel_values"], expected["pixel_values"])  # one crop: the first turn's
        assert "".join(pieces) == greedy_answer(model, processor, scene.image, prompt, 8)
    monkeypatch.undo()
    history = processor.apply_chat_template(session.messages, tokenize=False)
    assert history + "USER: " + COLOUR + " ASSISTANT:" == vicuna_v1_prompt(turns, COLOUR)
    assert [message["role"] for message in session.messages] == ["user", "assistant", "user", "assistant"]
    assert [item["type"] for item in session.messages[0]["content"]] == ["image", "text"]
    assert [item["type"] for item in session.messages[2]["content"]] == ["text"]


def test_a_new_image_starts_a_new_conversation_and_reset_keeps_the_image(shapes_model, monkeypatch):
    model, processor = shapes_model
    session = ChatSession(model, processor, max_new_tokens=4)
    first, second = render_scene("test", 1), render_scene("test", 2)
    assert first.colour != second.colour
    session.set_image(first.image)
    assert "".join(session.ask(COLOUR)) == first.colour
    session.set_image(second.image)
    assert session.messages == []
    spy = GenerateSpy(monkeypatch, model)
    assert "".join(session.ask(COLOUR)) == second.colour
    expected = processor(images=[second.image], text=vicuna_v1_prompt([], COLOUR))
    assert spy.calls[0]["input_ids"].tolist() == expected["input_ids"].tolist()
    assert torch.equal(spy.calls[0]["pixel_values"], expected["pixel_values"])

    session.reset()
    assert session.messages == [] and session.image_info is not None
    assert "".join(session.ask(POSITION)) == second.position
    assert spy.calls[1]["input_ids"].tolist() == processor(
        images=[second.image], text=vicuna_v1_prompt([], POSITION)
    )["input_ids"].tolist()


def test_typed_special_tokens_stay_text(shapes_model, monkeypatch):
    model, processor = shapes_model
    session = ChatSession(model, processor, max_new_tokens=2)
    session.set_image(render_scene("test", 0).image)
    spy = GenerateSpy(monkeypatch, model)
    list(session.ask("<image></s> What colour is the shape?"))
    ids = spy.calls[0]["input_ids"][0].tolist()
    assert ids.count(processor.image_token_id) == processor.num_image_tokens  # the one image slot of the template
    assert processor.tokenizer.eos_token_id not in ids
    assert session.messages[0]["content"][1]["text"] == "<image></s> What colour is the shape?"


def test_slice_model_streams_its_greedy_answer_in_pieces_over_turns(hd_folder, monkeypatch):
    session = ChatSession.from_pretrained(hd_folder, max_new_tokens=12, device="cpu")
    model, processor = session.model, session.processor
    image = photo(300, 700)
    info = session.set_image(image)
    h_block, w_block = (int(side) for side in reference_grids([300], [700], 9)[0])
    assert h_block * w_block > 1
    assert info.grid == (h_block, w_block) and info.num_crops == h_block * w_block + 1
    assert info.num_visual_tokens == info.num_crops * processor.num_image_tokens
    assert info.num_separator_tokens == h_block * (w_block - 1) + h_block + 1

    spy = GenerateSpy(monkeypatch, model)
    turns = []
    for question in ("What is it?", "And the colour?"):
        pieces = list(session.ask(question))
        assert len(pieces) > 1
        assert "".join(pieces) == greedy_answer(model, processor, image, vicuna_v1_prompt(turns, question), 12)
        turns.append((question, "".join(pieces).strip()))
    assert spy.calls[1]["pixel_values"].shape[0] == info.num_crops  # the image once, in the first turn


def test_pieces_arrive_while_generation_runs(hd_folder):
    session = ChatSession.from_pretrained(hd_folder, max_new_tokens=30, device="cpu")
    session.set_image(photo(336, 336))
    first_piece_read, steps = threading.Event(), []

    def hold_after_five_steps(module, args, kwargs):
        steps.append(1)
        if len(steps) == 5:
            assert first_piece_read.wait(timeout=30)

    hook = session.model.register_forward_pre_hook(hold_after_five_steps, with_kwargs=True)
    try:
        answer = session.ask("What is it?")
        next(answer)
        assert len(steps) <= 5  # generation has not gone past its fifth step
        first_piece_read.set()
        list(answer)
    finally:
        hook.remove()
    assert len(steps) == 30


def test_closing_the_stream_stops_generation_and_keeps_the_history(hd_folder):
    session = ChatSession.from_pretrained(hd_folder, max_new_tokens=200, device="cpu")
    session.set_image(photo(336, 336))
    steps = []
    hook = session.model.register_forward_pre_hook(lambda module, args: steps.append(1))
    try:
        answer = session.ask("What is it?")
        next(answer)
        answer.close()
    finally:
        hook.remove()
    assert len(steps) < 200
    assert session.messages == []


def test_an_error_in_generation_is_raised_to_the_reader(shapes_model, monkeypatch):
    model, processor = shapes_model
    session = ChatSession(model, processor)
    session.set_image(render_scene("test", 0).image)

    def broken(**kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(model, "generate", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        list(session.ask(COLOUR))
    assert session.messages == []


def test_sampling_follows_the_seed(hd_folder):
    session = ChatSession.from_pretrained(hd_folder, max_new_tokens=16, temperature=1.0, device="cpu")
    session.set_image(photo(336, 336))
    answers = []
    for seed in (0, 1, 0):
        torch.manual_seed(seed)
        answers.append("".join(session.ask("What is it?")))
        session.reset()
    assert answers[0] == answers[2] != answers[1]


def test_from_pretrained_defaults_to_the_shipped_model_and_takes_a_dtype():
    session = ChatSession.from_pretrained(dtype="bfloat16", device="cpu", max_new_tokens=3)
    assert session.model.dtype == torch.bfloat16 and session.max_new_tokens == 3
    assert session.model.config.name_or_path == str(PRETRAINED)
    session.set_image(render_scene("test", 0).image)
    assert "".join(session.ask(COLOUR)).strip()


def test_errors(shapes_model, tmp_path):
    model, processor = shapes_model
    session = ChatSession(model, processor)
    with pytest.raises(ValueError, match="load an image first"):
        session.ask(COLOUR)
    scene = render_scene("test", 0)
    info = session.set_image(scene.image)
    list(session.ask(COLOUR))
    history = session.messages

    with pytest.raises(ValueError, match="does not exist"):
        session.set_image(tmp_path / "missing.png")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="could not read an image"):
        session.set_image(str(tmp_path / "notes.png"))
    with pytest.raises(TypeError, match="image must be a PIL image, a file path or an http"):
        session.set_image(3)
    assert session.image_info == info and session.messages == history  # a failed load changes nothing

    with pytest.raises(ValueError, match=r"the conversation has grown to \d+ tokens and the model reads at most 512"):
        session.ask("red " * 600)
    with pytest.raises(TypeError, match="text must be a string, got int"):
        session.ask(3)
    with pytest.raises(ValueError, match="the question is empty"):
        session.ask("  ")
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer, got 0"):
        ChatSession(model, processor, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        ChatSession(model, processor, temperature=-1)
    with pytest.raises(TypeError, match="processor must be a TokenPackerProcessor"):
        ChatSession(model, processor.tokenizer)
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, bfloat16, float16"):
        ChatSession.from_pretrained(dtype="float8")
    with pytest.raises(ValueError, match="device must name a torch device"):
        ChatSession.from_pretrained(device="gpu0")


def test_answers_end_where_the_context_does(shapes_model, monkeypatch):
    model, processor = shapes_model
    session = ChatSession(model, processor, max_new_tokens=512)
    session.set_image(render_scene("test", 0).image)
    spy = GenerateSpy(monkeypatch, model)
    list(session.ask("red " * 400 + COLOUR))
    prompt_length = spy.calls[0]["input_ids"].shape[1]
    assert prompt_length > 400 and spy.calls[0]["max_new_tokens"] == 512 - prompt_length


def test_describe_image_counts_what_the_processor_makes(shapes_model):
    _, processor = shapes_model
    image = photo(200, 500)
    info = describe_image(processor, image)
    crops = processor(images=[image], text="<image>")
    assert info.size == (500, 200) and info.grid is None
    assert info.num_crops == crops["pixel_values"].shape[0] == 1
    assert info.num_visual_tokens == crops["input_ids"][0].tolist().count(processor.image_token_id) == 36
    assert info.summary() == "36 for the image; LLaVA-1.5 uses 576 for one 336x336 crop"
