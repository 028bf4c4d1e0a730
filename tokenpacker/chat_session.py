"""A multi-turn chat about one image with a TokenPacker model, its answers streamed as they are generated.

`ChatSession` keeps the conversation the way the original's `llava/serve/cli.py` did with its Vicuna v1 template:
"{system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:", the image with the first question only. The
prompt is the processor's chat template, tokenized with `apply_chat_template(tokenize=True)`, so typed text stays
text. The terminal chat (`tokenpacker.chat`) and the web demo are built on it; this module imports neither.
"""

import math
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from numbers import Real

import PIL.Image
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, StoppingCriteria, TextIteratorStreamer

from .shapes import PRETRAINED

LLAVA_VISUAL_TOKENS = 576  # LLaVA-1.5's MLP projector: one token per CLIP ViT-L/14-336 patch
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ImageInfo:
    """What an image becomes in the prompt.

    `num_visual_tokens` counts the projected image tokens only; in "slice" mode the ',' and row-end separator tokens
    between the crops come on top of them (`num_separator_tokens`).
    """

    size: tuple[int, int]  # (width, height) of the image as given
    num_crops: int  # crops fed to the tower: 1 for "pad"; the grid's blocks and, for more than one, a thumbnail
    grid: tuple[int, int] | None  # (h_block, w_block) for "slice", None for "pad"
    num_visual_tokens: int
    num_separator_tokens: int = 0

    def summary(self) -> str:
        """How many tokens the image takes in the language model, next to LLaVA-1.5's 576."""
        summary = f"{self.num_visual_tokens} for the image"
        if self.grid is not None:
            h_block, w_block = self.grid
            thumbnail = " + 1 thumbnail" if self.num_crops > h_block * w_block else ""
            summary += (
                f" ({h_block}x{w_block} grid of crops{thumbnail}, {self.num_visual_tokens // self.num_crops} tokens "
                f"per crop, plus {self.num_separator_tokens} separator tokens)"
            )
        return summary + f"; LLaVA-1.5 uses {LLAVA_VISUAL_TOKENS} for one 336x336 crop"


def describe_image(processor, image: PIL.Image.Image) -> ImageInfo:
    """The crops and prompt tokens of `image` with this TokenPacker processor (its image processor's own output)."""
    image_processor = processor.image_processor
    crops = image_processor(image, return_tensors="pt")
    mode = image_processor.image_aspect_ratio
    h_block, w_block = crops["image_grids"][0].tolist()
    layout = processor.image_token_layout(h_block, w_block, mode)
    visual_tokens = layout.count(processor.image_token_id)
    return ImageInfo(
        size=(image.width, image.height),
        num_crops=crops["pixel_values"].shape[0],
        grid=(h_block, w_block) if mode == "slice" else None,
        num_visual_tokens=visual_tokens,
        num_separator_tokens=len(layout) - visual_tokens,
    )


class _StopWhenSet(StoppingCriteria):
    """Stops generation once `event` is set: the reader of the stream went away."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ChatSession:
    """One conversation about one image with a TokenPacker model (the original's Vicuna v1 history, as its cli.py).

    Args:
        model: a `TokenPackerForConditionalGeneration` (it may be shared by several sessions; serialise their
            generation yourself).
        processor: its `TokenPackerProcessor`.
        max_new_tokens: the longest answer, in tokens.
        temperature: 0 answers greedily; above 0 samples at that temperature.
    """

    def __init__(self, model, processor, *, max_new_tokens: int = 512, temperature: float = 0.0):
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, Real) or not 0 <= temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
        for name in ("image_processor", "image_token_layout", "apply_chat_template"):
            if not hasattr(processor, name):
                raise TypeError(f"processor must be a TokenPackerProcessor (it has no {name}), got {type(processor)}")
        self.model = model
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self.temperature = float(temperature)
        self._image: PIL.Image.Image | None = None
        self._image_info: ImageInfo | None = None
        self._messages: list[dict] = []
        self._stop = threading.Event()  # the stop signal of the answer being generated

    @classmethod
    def from_pretrained(
        cls, path=None, *, dtype: str | torch.dtype | None = None, device: str | None = None, **kwargs
    ) -> "ChatSession":
        """A session on the TokenPacker model at `path` (a folder or a Hub id; None: the shipped tiny-shapes model).

        `dtype`: one of "auto", "float32", "bfloat16", "float16" or a torch dtype (None: transformers' default).
        `device`: where the model runs (None: "cuda" when available, else "cpu"). `kwargs` are the session's
        (`max_new_tokens`, `temperature`).
        """
        if isinstance(dtype, str) and dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)} or a torch.dtype, got {dtype!r}")
        if dtype is not None and not isinstance(dtype, (str, torch.dtype)):
            raise TypeError(f"dtype must be a string or a torch.dtype, got {type(dtype).__name__}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"device must name a torch device such as 'cpu' or 'cuda:0', got {device!r}") from error
        path = PRETRAINED if path is None else path
        dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
        model = AutoModelForImageTextToText.from_pretrained(path, **({} if dtype is None else {"dtype": dtype}))
        processor = AutoProcessor.from_pretrained(path)
        return cls(model.to(device).eval(), processor, **kwargs)

    def set_image(self, image) -> ImageInfo:
        """Loads `image` (a PIL image, a file path or an http(s) URL) and starts a new conversation about it.

        An image that cannot be loaded raises the image processor's ValueError and leaves the session as it was.
        """
        if not isinstance(image, (PIL.Image.Image, str, os.PathLike)):
            raise TypeError(f"image must be a PIL image, a file path or an http(s) URL, got {type(image).__name__}")
        image_processor = self.processor.image_processor
        loaded = image_processor.process_image(image, do_convert_rgb=image_processor.do_convert_rgb)
        info = describe_image(self.processor, loaded)
        self._image, self._image_info, self._messages = loaded, info, []
        return info

    def stop(self) -> None:
        """Stops the answer being generated, if any, after its current token; safe from another thread or a signal
        handler. Its stream then ends, and the history stays as it was."""
        self._stop.set()

    def reset(self) -> None:
        """Forgets the questions and answers; the image stays."""
        self._messages = []

    @property
    def image_info(self) -> ImageInfo | None:
        return self._image_info

    @property
    def messages(self) -> list[dict]:
        """The chat so far, in transformers' chat-message format (a copy); the image is in the first user message."""
        return [{**message, "content": [dict(item) for item in message["content"]]} for message in self._messages]

    def ask(self, text: str) -> Iterator[str]:
        """Streams the answer to `text` in pieces of text as they are generated.

        The question and the answer join the history once the iterator is exhausted; an answer stopped early (the
        iterator closed) stops generation and leaves the history as it was. Answers end where the model's context
        (`max_position_embeddings`) does; a conversation that fills it raises a ValueError.
        """
        if self._image is None:
            raise ValueError("load an image first: set_image(image) with a PIL image, a file path or an http(s) URL")
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {type(text).__name__}")
        if not text.strip():
            raise ValueError("the question is empty")
        self._stop = threading.Event()
        content = [{"type": "text", "text": text}]
        if not self._messages:
            content.insert(0, {"type": "image", "image": self._image})
        question = {"role": "user", "content": content}
        inputs = self.processor.apply_chat_template(
            [*self._messages, question],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
        prompt_length = inputs["input_ids"].shape[1]
        context = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        if context is not None and prompt_length >= context:
            raise ValueError(
                f"the conversation has grown to {prompt_length} tokens and the model reads at most {context}: reset "
                "it or load an image to start again"
            )
        max_new_tokens = self.max_new_tokens if context is None else min(self.max_new_tokens, context - prompt_length)
        inputs = inputs.to(self.model.device, dtype=self.model.dtype)
        return self._stream(question, inputs, self._generation_kwargs(max_new_tokens))

    def _generation_kwargs(self, max_new_tokens: int) -> dict:
        if self.temperature == 0:
            return {"max_new_tokens": max_new_tokens, "do_sample": False}
        return {"max_new_tokens": max_new_tokens, "do_sample": True, "temperature": self.temperature}

    def _stream(self, question: dict, inputs, generation_kwargs: dict) -> Iterator[str]:
        """Runs `generate` in a thread and yields the streamer's text; its error, if any, is raised here."""
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = self._stop
        errors = []

        def generate():
            try:
                self.model.generate(
                    **inputs, streamer=streamer, stopping_criteria=[_StopWhenSet(stop)], **generation_kwargs
                )
            except Exception as error:
                errors.append(error)
                streamer.end()

        thread = threading.Thread(target=generate, name="tokenpacker-chat-generate", daemon=True)
        thread.start()
        pieces = []
        try:
            for piece in streamer:
                if piece:
                    pieces.append(piece)
                    yield piece
        finally:
            stop.set()
            thread.join()
        if errors:
            raise errors[0]
        answer = {"role": "assistant", "content": [{"type": "text", "text": "".join(pieces).strip()}]}
        self._messages = [*self._messages, question, answer]


__all__ = ["ChatSession", "ImageInfo", "describe_image"]
