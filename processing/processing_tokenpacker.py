"""TokenPacker processor: images and prompts -> the input ids and crops of the original LLaVA-1.5 / TokenPacker-HD."""

import os
import re
from contextvars import ContextVar

from transformers import BatchFeature, ProcessorMixin
from transformers.image_utils import is_valid_image
from transformers.processing_utils import MultiModalData, ProcessingKwargs

from ..configuration.configuration_tokenpacker import RemoteCodeMixin
from .image_processing_tokenpacker import TokenPackerImageProcessor, select_slice_grid

IMAGE_TOKEN = "<image>"
ANSWER_PREFIX = "ASSISTANT:"
# The system prompt of the original's `conv_vicuna_v1` template, the one its training and evaluation scripts use.
VICUNA_V1_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# Vicuna v1 ("SeparatorStyle.TWO"): "{system} USER: {question} ASSISTANT: {answer}</s>USER: ... ASSISTANT:".
# Images of a message come first, one "<image>\n" each, like the original's "<image>\n{question}".
VICUNA_V1_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set system_prompt = messages[0]['content'] -%}"
    "{%- else -%}{%- set system_prompt = messages[0]['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join(' ') -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_prompt = '" + VICUNA_V1_SYSTEM_PROMPT.replace("'", "\\'") + "' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{{- system_prompt + ' ' -}}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' -}}"
    "{%- else -%}{{- raise_exception('Vicuna v1 chats take user and assistant messages after an optional first "
    "system message, got role ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] if item['type'] == 'image' -%}{{- '<image>\n' -}}{%- endfor -%}"
    "{{- message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{- ' ' -}}{%- else -%}{{- '</s>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '" + ANSWER_PREFIX + "' -}}{%- endif -%}"
)
CONTENT_TYPES = ("text", "image")
IMAGE_SOURCES = ("image", "url", "path", "base64")  # the keys `ProcessorMixin.apply_chat_template` loads images from
# While `apply_chat_template` tokenizes, the prompt it renders holds a sentinel in place of each message text, and
# this holds the texts: they are tokenized as text, never as special tokens or image markers.
_MESSAGE_TEXTS: ContextVar[list[str] | None] = ContextVar("message_texts", default=None)
_SENTINEL = re.compile("\ue000(\\d+)\ue001")


class TokenPackerProcessorKwargs(ProcessingKwargs, total=False):
    _defaults = {"text_kwargs": {"padding": True, "padding_side": "left", "return_tensors": "pt"}}


class TokenPackerProcessor(RemoteCodeMixin, ProcessorMixin):
    r"""
    Turns images and prompts into TokenPacker's inputs, exactly as the original LLaVA-1.5 code does.

    Each prompt is split at the `<image>` markers and every text chunk is tokenized on its own (only the first one
    starts with BOS), so the text after an image starts with sentencepiece's lone '▁' piece, as in the original. Each
    `<image>` becomes its crops' image-token ids: `num_image_tokens` for an image in `"pad"` mode; in `"slice"`
    (TokenPacker-HD) mode, one row of block tokens per grid row with `slice_separator_token_id` between the blocks of
    a row and `row_separator_token_id` at its end, then, for grids of more than one block, the thumbnail's tokens and
    `row_separator_token_id`. The crops come in the same order from the image processor.

    `batch_decode` and `decode` decode like the tokenizer; `post_process_image_text_to_text` returns answers: the text
    after the last "ASSISTANT:" of the Vicuna v1 prompt (the whole text when there is none), special tokens skipped by
    default.

    Args:
        image_processor (`TokenPackerImageProcessor`):
            Makes the crops (`pixel_values`) and tells each image's grid of blocks (`image_grids`).
        tokenizer (`PreTrainedTokenizerFast`):
            A tokenizer with the ids of the original sentencepiece model and `image_token` as a special token.
        num_image_tokens (`int`, *optional*, defaults to 144):
            Tokens per crop: 144, 64 or 36 for the projector's scale factors 2, 3 and 4.
        slice_separator_token_id (`int`, *optional*, defaults to 29892):
            Id between two blocks of a row in `"slice"` mode (',' in LLaMA's vocabulary).
        row_separator_token_id (`int`, *optional*, defaults to 0):
            Id after each row of blocks and after the thumbnail in `"slice"` mode (the original's '\n', unknown to
            LLaMA's vocabulary, hence 0).
        chat_template (`str`, *optional*):
            Jinja chat template; defaults to the original's Vicuna v1 conversation.
        image_token (`str`, *optional*, defaults to `"<image>"`):
            The image marker in prompts.
    """

    valid_processor_kwargs = TokenPackerProcessorKwargs
    remote_code_auto_map = {
        location: {
            "AutoProcessor": "processing_tokenpacker.TokenPackerProcessor",
            "AutoImageProcessor": "image_processing_tokenpacker.TokenPackerImageProcessor",
        }
        for location in ("processor_config.json", "processor_config.json/image_processor", "preprocessor_config.json")
    } | {"tokenizer_config.json": {"AutoProcessor": "processing_tokenpacker.TokenPackerProcessor"}}
    supported_text_kwargs = (
        "add_special_tokens",
        "padding",
        "padding_side",
        "max_length",
        "pad_to_multiple_of",
        "return_attention_mask",
        "return_tensors",
    )

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens: int = 144,
        slice_separator_token_id: int = 29892,
        row_separator_token_id: int = 0,
        chat_template: str | None = None,
        image_token: str = IMAGE_TOKEN,
    ):
        if isinstance(num_image_tokens, bool) or not isinstance(num_image_tokens, int) or num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be a positive integer, got {num_image_tokens!r}")
        image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if image_token_id is None or image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"The tokenizer has no {image_token!r} token; add it as a special token")
        for name, value in (
            ("slice_separator_token_id", slice_separator_token_id),
            ("row_separator_token_id", row_separator_token_id),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(tokenizer):
                raise ValueError(f"{name} must be a token id below the tokenizer's {len(tokenizer)}, got {value!r}")
        self.num_image_tokens = num_image_tokens
        self.slice_separator_token_id = slice_separator_token_id
        self.row_separator_token_id = row_separator_token_id
        self.image_token = image_token
        self.image_token_id = image_token_id
        super().__init__(image_processor, tokenizer, chat_template=chat_template or VICUNA_V1_CHAT_TEMPLATE)

    @classmethod
    def from_model_config(cls, config, tokenizer, **image_processor_kwargs) -> "TokenPackerProcessor":
        """The processor for a model with this `TokenPackerConfig`: its mode, crops, token ids and tokens per crop."""
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if image_token_id != config.image_token_id:
            raise ValueError(
                f"The tokenizer's {IMAGE_TOKEN} id is {image_token_id} but the model's image_token_id is "
                f"{config.image_token_id}"
            )
        image_processor = TokenPackerImageProcessor(
            image_aspect_ratio=config.image_aspect_ratio, max_slices=config.max_slices, **image_processor_kwargs
        )
        return cls(
            image_processor,
            tokenizer,
            num_image_tokens=config.num_image_tokens,
            slice_separator_token_id=config.slice_separator_token_id,
            row_separator_token_id=config.row_separator_token_id,
        )

    def __call__(self, images=None, text=None, **kwargs) -> BatchFeature:
        """Prompt(s) with one `<image>` per image -> `input_ids`, `attention_mask` and (with images) `pixel_values`.

        `images` is an image, a 4-D batch array or tensor, a list of images (taken in the order of the markers across
        the batch), or one list of images per prompt. A batch is padded on the left unless `padding_side="right"` is
        given.

        Prompts are trusted, template-level text: every `<image>` in them is an image slot and the tokenizer's special
        tokens in them (`</s>`, `<s>`...) get their special ids, as the original's slow tokenizer parsed them. Text
        typed by users belongs in a conversation given to `apply_chat_template(..., tokenize=True)`, which tokenizes
        message texts as plain text.
        """
        if text is None:
            raise ValueError(f"TokenPackerProcessor needs text: a prompt with one {self.image_token!r} per image")
        prompts = [text] if isinstance(text, str) else text
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"text must be a string or a non-empty list of strings, got {type(text).__name__}")
        image_counts = [prompt.count(self.image_token) for prompt in prompts]
        flat_images = self._flat_images(images, image_counts)

        merged = self._merge_kwargs(TokenPackerProcessorKwargs, **kwargs)
        text_kwargs = merged["text_kwargs"]
        if text_kwargs.get("truncation") in (None, False):  # nothing to truncate: as if not given
            text_kwargs.pop("truncation", None)
        unsupported = sorted(
            key
            for key, value in text_kwargs.items()
            if key not in self.supported_text_kwargs and value not in (None, False)
        )
        if unsupported:
            raise ValueError(
                f"TokenPackerProcessor does not support {unsupported}: the image tokens must stay whole; "
                f"supported text arguments: {list(self.supported_text_kwargs)}"
            )
        return_tensors = text_kwargs.pop("return_tensors", None)
        add_special_tokens = text_kwargs.pop("add_special_tokens", True)

        pixel_values, image_ids = None, []
        if flat_images:
            images_kwargs = {**merged["images_kwargs"], "return_tensors": "pt"}
            image_inputs = self.image_processor(flat_images, **images_kwargs)
            pixel_values = image_inputs["pixel_values"]  # (total crops, 3, 336, 336)
            mode = images_kwargs.get("image_aspect_ratio") or self.image_processor.image_aspect_ratio
            image_ids = [self.image_token_layout(h, w, mode) for h, w in image_inputs["image_grids"].tolist()]

        input_ids = self._expand(prompts, image_ids, add_special_tokens)
        padded = self.tokenizer.pad({"input_ids": input_ids}, return_tensors=return_tensors, **text_kwargs)
        data = {key: padded[key] for key in ("input_ids", "attention_mask") if key in padded}
        if pixel_values is not None:
            data["pixel_values"] = pixel_values
        return BatchFeature(data, tensor_type=return_tensors)

    def image_token_layout(self, h_block: int, w_block: int, image_aspect_ratio: str) -> list[int]:
        """The ids of an image with `h_block` x `w_block` blocks, its crops in the image processor's order."""
        crop = [self.image_token_id] * self.num_image_tokens
        if image_aspect_ratio == "pad":
            return crop
        ids = []
        for _ in range(h_block):
            for column in range(w_block):
                ids += crop
                if column < w_block - 1:
                    ids.append(self.slice_separator_token_id)
            ids.append(self.row_separator_token_id)
        if h_block * w_block > 1:
            ids += crop + [self.row_separator_token_id]  # the thumbnail
        return ids

    def _flat_images(self, images, image_counts: list[int]) -> list:
        """Checks the images against the `<image>` markers and returns them flat, in marker order.

        `images` is None, one image, a 4-D batch array or tensor, a flat list of images or one list of images per
        prompt; a listed image is a single image, never a list or a 4-D batch (which would count as several images).
        """
        if images is None:
            images = []
        elif is_valid_image(images) and getattr(images, "ndim", None) == 4:  # a batch of images in one array or tensor
            images = list(images)
        elif not isinstance(images, (list, tuple)):
            images = [_single_image(images, "images")]
        nested = [isinstance(item, (list, tuple)) for item in images]
        if any(nested) and not all(nested):
            given = ", ".join(type(item).__name__ for item in images[:10]) + (", ..." if len(images) > 10 else "")
            raise ValueError(
                "images must be a flat list of images or one list of images per prompt, got a list mixing lists and "
                f"single images: [{given}]"
            )
        if any(nested):
            if len(images) != len(image_counts):
                raise ValueError(
                    f"Got {len(images)} lists of images (one per prompt) but {len(image_counts)} prompt(s)"
                )
            for index, (sample_images, count) in enumerate(zip(images, image_counts, strict=True)):
                if len(sample_images) != count:
                    raise ValueError(
                        f"Prompt {index} holds {count} {self.image_token} marker(s) but {len(sample_images)} image(s) "
                        "were given for it"
                    )
            images = [
                _single_image(image, f"images[{index}][{position}]")
                for index, sample_images in enumerate(images)
                for position, image in enumerate(sample_images)
            ]
        else:
            images = [_single_image(image, f"images[{index}]") for index, image in enumerate(images)]
        if len(images) != sum(image_counts):
            raise ValueError(
                f"The prompts hold {sum(image_counts)} {self.image_token} marker(s) in total "
                f"(per prompt: {', '.join(map(str, image_counts))}) but {len(images)} image(s) were given"
            )
        return images

    def _expand(self, prompts: list[str], image_ids: list[list[int]], add_special_tokens: bool) -> list[list[int]]:
        """Like the original's `tokenizer_image_token`: chunks tokenized on their own, image ids between them."""
        chunks_per_prompt = [prompt.split(self.image_token) for prompt in prompts]
        flat_chunks = [chunk for chunks in chunks_per_prompt for chunk in chunks]
        message_texts = _MESSAGE_TEXTS.get()
        if message_texts is None:
            chunk_ids = iter(self.tokenizer(flat_chunks, add_special_tokens=False)["input_ids"])
        else:
            chunk_ids = iter(self._encode_rendered_chunks(flat_chunks, message_texts))
        images = iter(image_ids)
        input_ids = []
        for chunks in chunks_per_prompt:
            ids = [self.tokenizer.bos_token_id] if add_special_tokens else []
            for index in range(len(chunks)):
                if index > 0:
                    ids += next(images)
                ids += next(chunk_ids)
            input_ids.append(ids)
        return input_ids

    def _encode_rendered_chunks(self, chunks: list[str], message_texts: list[str]) -> list[list[int]]:
        """Ids of chunks of a rendered chat whose message texts are sentinels.

        The template's own added tokens (`</s>`, BOS) keep their ids. The text between two of them, the message texts
        put back in place of their sentinels, is tokenized as one string with no added token parsed in it: the ids of
        a benign chat are those of its rendered prompt, and typed special tokens stay text.
        """
        added_tokens = sorted(self.tokenizer.added_tokens_encoder, key=len, reverse=True)
        splitter = re.compile("(" + "|".join(map(re.escape, added_tokens)) + ")")
        pieces_per_chunk = [splitter.split(chunk) for chunk in chunks]  # [text, token, text, ..., token, text]
        texts = [_put_back(piece, message_texts) for pieces in pieces_per_chunk for piece in pieces[::2]]
        text_ids = iter(self.tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"])
        ids_per_chunk = []
        for pieces in pieces_per_chunk:
            ids = []
            for index, piece in enumerate(pieces):
                ids += next(text_ids) if index % 2 == 0 else [self.tokenizer.added_tokens_encoder[piece]]
            ids_per_chunk.append(ids)
        return ids_per_chunk

    def apply_chat_template(self, conversation, chat_template: str | None = None, **kwargs):
        """`ProcessorMixin.apply_chat_template` for TokenPacker's chats, with message texts kept as text.

        With `tokenize=True` (what the `image-text-to-text` pipeline uses) the texts of the messages, system message
        included, are tokenized as plain text: `</s>` or `<image>` typed in them give no special id and no image slot.
        Only the template writes special ids (`</s>` after assistant turns, BOS) and image slots (one per
        `{"type": "image"}` item, which needs one of the keys image, url, path or base64). With `tokenize=False`
        (the default) the rendered prompt string is returned, as transformers does; passing that string to the
        processor treats it as trusted text, in which typed `</s>` and `<image>` are parsed.
        """
        conversations, is_batched = self._checked_conversations(conversation, kwargs.get("tokenize", False))
        if not kwargs.get("tokenize", False):
            return super().apply_chat_template(conversation, chat_template, **kwargs)
        kwargs.pop("sanitize_control_tokens", None)  # message texts are always tokenized as text here
        message_texts = []
        marked = [_with_sentinels(messages, message_texts) for messages in conversations]
        rendering = {**kwargs, "tokenize": False}
        prompts = super().apply_chat_template(conversations, chat_template, **rendering)
        marked_prompts = super().apply_chat_template(marked, chat_template, **rendering)
        for index, (prompt, marked_prompt) in enumerate(zip(prompts, marked_prompts, strict=True)):
            if _put_back(marked_prompt, message_texts) != prompt:
                raise ValueError(
                    f"The chat template changes the message texts of conversation {index} (or writes other message "
                    "fields), so its own text and the messages' cannot be told apart for tokenizing"
                )
        token = _MESSAGE_TEXTS.set(message_texts)
        try:
            return super().apply_chat_template(marked if is_batched else marked[0], chat_template, **kwargs)
        finally:
            _MESSAGE_TEXTS.reset(token)

    def _checked_conversations(self, conversation, needs_image_sources: bool) -> tuple[list[list[dict]], bool]:
        """The conversation(s) as lists of message dicts, and whether a batch was given; refuses malformed ones."""
        if isinstance(conversation, (list, tuple)) and not conversation:
            raise ValueError("apply_chat_template needs a conversation with at least one message, got an empty list")
        is_batched = isinstance(conversation[0], (list, tuple)) if isinstance(conversation, (list, tuple)) else False
        conversations = list(conversation) if is_batched else [conversation]
        for conversation_index, messages in enumerate(conversations):
            batch_place = f" of conversation {conversation_index}" if is_batched else ""
            if not messages:
                raise ValueError(f"Conversation {conversation_index} of the batch has no messages")
            for message_index, message in enumerate(messages):
                where = f"message {message_index}{batch_place}"
                role = message.get("role")
                if role not in ("user", "assistant") and (role != "system" or message_index > 0):
                    raise ValueError(
                        "TokenPacker chats take user and assistant messages after an optional first system message, "
                        f"got role {role} for {where}"
                    )
                content = message.get("content")
                if isinstance(content, str):
                    continue
                if not isinstance(content, (list, tuple)):
                    raise ValueError(
                        f"The content of {where} must be a string or a list of items, got {type(content).__name__}"
                    )
                for item_index, item in enumerate(content):
                    _check_content_item(item, f"item {item_index} of {where}", needs_image_sources)
        return conversations, is_batched

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs):
        """The answers of `generate`'s output, (batch, length) -> list of strings; (length,) -> one string."""
        if getattr(generated_outputs, "ndim", None) == 1 or (
            isinstance(generated_outputs, (list, tuple))
            and generated_outputs
            and isinstance(generated_outputs[0], int)
        ):
            return self._answer(self.decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs))
        texts = self.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)
        return [self._answer(text) for text in texts]

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        """Per image of (height, width) in `image_sizes`: its crops (`num_image_patches`) and the length of the id
        run its `<image>` becomes (`num_image_tokens`, the `"slice"` separators included)."""
        if image_sizes is None:
            return MultiModalData()
        images_kwargs = self._merge_kwargs(TokenPackerProcessorKwargs, **kwargs)["images_kwargs"]
        settings = {
            name: images_kwargs.get(name) or getattr(self.image_processor, name)
            for name in ("image_aspect_ratio", "max_slices", "crop_size")
        }
        mode, crop_size = settings["image_aspect_ratio"], settings["crop_size"]
        block_size = (crop_size["height"], crop_size["width"])
        num_image_tokens, num_image_patches = [], []
        for height, width in image_sizes:
            grid = (1, 1) if mode == "pad" else select_slice_grid(height, width, settings["max_slices"], block_size)
            num_image_tokens.append(len(self.image_token_layout(*grid, mode)))
            num_image_patches.append(self.image_processor.num_crops(*grid))
        return MultiModalData(num_image_tokens=num_image_tokens, num_image_patches=num_image_patches)

    @staticmethod
    def _answer(text: str) -> str:
        _, found, answer = text.rpartition(ANSWER_PREFIX)
        return answer.strip() if found else text

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]


def _single_image(image, where: str):
    """`image` if it is one image: a PIL image, a 2-D or 3-D array or tensor, a path or a URL."""
    if is_valid_image(image) and getattr(image, "ndim", None) == 4:
        raise ValueError(
            f"{where} is a 4-D batch of shape {tuple(image.shape)} inside a list; give a 4-D batch on its own as "
            "images, or one image per list entry"
        )
    if not (is_valid_image(image) or isinstance(image, (str, os.PathLike))):
        raise TypeError(
            f"{where} must be an image (a PIL image, a 2-D or 3-D array or tensor, a path or a URL), "
            f"got {type(image).__name__}"
        )
    return image


def _check_content_item(item, where: str, needs_image_source: bool):
    """Refuses a message content item that is not `{"type": "text", "text": str}` or an image item."""
    if not isinstance(item, dict) or "type" not in item:
        given = f"a dict with keys {sorted(item)}" if isinstance(item, dict) else type(item).__name__
        raise ValueError(f"{where} must be a dict with a 'type' ('text' or 'image'), got {given}")
    if item["type"] not in CONTENT_TYPES:
        raise ValueError(f"{where} has type {item['type']!r}; TokenPacker chats take 'text' and 'image' items")
    if item["type"] == "text" and not isinstance(item.get("text"), str):
        raise ValueError(f"{where} is a text item whose 'text' must be a string, got {type(item.get('text')).__name__}")
    sources = [key for key in IMAGE_SOURCES if key in item]
    if item["type"] == "image" and needs_image_source and len(sources) != 1:
        raise ValueError(
            f"{where} is an image item, which needs exactly one of the keys {', '.join(IMAGE_SOURCES)} to be "
            f"tokenized, got {sources or 'none'}"
        )


def _with_sentinels(messages: list[dict], message_texts: list[str]) -> list[dict]:
    """Copies of `messages` with each text replaced by a sentinel; the texts are appended to `message_texts`."""

    def sentinel(text: str) -> str:
        message_texts.append(text)
        return f"\ue000{len(message_texts) - 1}\ue001"

    marked = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            content = sentinel(content)
        else:
            content = [{**item, "text": sentinel(item["text"])} if item["type"] == "text" else item for item in content]
        marked.append({**message, "content": content})
    return marked


def _put_back(text: str, message_texts: list[str]) -> str:
    """`text` with the message texts in place of their sentinels (text that only looks like one is left as it is)."""

    def message_text(found: re.Match) -> str:
        index = int(found.group(1))
        return message_texts[index] if index < len(message_texts) else found.group(0)

    return _SENTINEL.sub(message_text, text)


__all__ = ["TokenPackerProcessor"]
