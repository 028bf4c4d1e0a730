"""Random inputs thrown at TokenPackerImageProcessor and TokenPackerProcessor: every call returns finite crops of the
right shape or raises a ValueError/TypeError that says something; never another exception and never a hang.

Bounded: a fixed seed and a time budget per test. Left out of the generators: URLs (the tests have no network) and
'pad' images whose longest side is over 2048 pixels (the padded square of a 1 x 50,000 image holds 2.5e9 pixels);
'slice' images go up to 1 x 50,000.
"""

import io
import random
import signal
import time

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import BatchFeature

from tokenpacker import TokenPackerImageProcessor

from .builders import CHAT_IMAGE_TOKEN_ID, tiny_processor

BUDGET_S = 17  # per test
CALL_LIMIT_S = 20  # one call longer than this is a hang
TOKENS = 36
CROP = (3, 336, 336)
MODES = ("1", "L", "LA", "P", "RGBA", "CMYK", "I", "I;16", "F", "RGB")
DTYPES = ("uint8", "int8", "uint16", "int32", "int64", "float16", "float32", "float64", "bool", "complex64", "object")
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF")
WORDS = ("<image>", "<image>\n", "</s>", "<s>", "<unk>", "<pad>", "USER:", "ASSISTANT:", "red", " ", "\n", "中", "é")


class Hang(BaseException):
    """Raised by the alarm when one call runs past CALL_LIMIT_S."""


def _alarm(signum, frame):
    raise Hang()


def size(rng, mode):
    if rng.random() < 0.1:
        return rng.choice([(0, 5), (5, 0), (0, 0), (1, 1)])
    if mode == "slice" and rng.random() < 0.1:
        return rng.choice([(1, 50000), (50000, 1), (2, 30000)])
    return rng.randint(1, 400), rng.randint(1, 400)


def pil_image(rng, mode):
    image_mode = rng.choice(MODES)
    width, height = size(rng, mode)
    colour = rng.randint(0, 255) if image_mode in ("1", "L", "P", "I", "I;16", "F") else None
    return PIL.Image.new(image_mode, (width, height), colour), f"PIL {image_mode} {width}x{height}"


def array(rng):
    dtype = rng.choice(DTYPES)
    shape = tuple(rng.choice([0, 1, 2, 3, 4, 5, 17, 64]) for _ in range(rng.randint(0, 5)))
    if np.prod(shape, dtype=np.int64) > 2_000_000:
        shape = (2, 3, 4)
    values = np.asarray(np.random.default_rng(rng.randint(0, 2**31)).normal(0.5, 1.0, shape))
    kind = rng.choice(["unit", "bytes", "wild"])
    if kind == "unit":
        values = values.clip(0, 1)
    elif kind == "bytes":
        values = (values.clip(0, 1) * 255).round()
    elif values.size:
        values.flat[rng.randrange(values.size)] = rng.choice([np.nan, np.inf, -np.inf, -3.0, 1e6])
    with np.errstate(all="ignore"):
        result = np.asarray(values, dtype=dtype)
    return result, f"array {dtype} {shape} {kind}"


def tensor(rng):
    values, description = array(rng)
    if values.dtype == object:
        return torch.zeros(3, 4, 5, dtype=torch.bfloat16), "tensor bfloat16 (3, 4, 5)"
    return torch.from_numpy(np.ascontiguousarray(values)), f"tensor from {description}"


def file(rng, folder):
    path = folder / f"{rng.randrange(10**9)}.img"
    kind = rng.choice(["random bytes", "image", "truncated image", "missing", "folder"])
    if kind == "random bytes":
        path.write_bytes(rng.randbytes(rng.randint(0, 300)))
    elif kind in ("image", "truncated image"):
        image, _ = pil_image(rng, "pad")
        data = io.BytesIO()
        try:
            image.convert("RGB").save(data, format=rng.choice(FORMATS))
        except (ValueError, OSError):
            data = io.BytesIO(b"not saved")
        content = data.getvalue()
        path.write_bytes(content[: rng.randint(0, len(content))] if kind == "truncated image" else content)
    elif kind == "folder":
        path = folder
    return (str(path) if rng.random() < 0.5 else path), f"file ({kind})"


def junk(rng):
    return rng.choice(
        [
            (None, "None"),
            (3, "int"),
            (2.5, "float"),
            ("", "empty string"),
            ("no such file", "string"),
            (b"\x89PNG", "bytes"),
            ({"image": 1}, "dict"),
            (io.BytesIO(rng.randbytes(20)), "BytesIO"),
        ]
    )


def one_image(rng, folder, mode):
    kind = rng.choices(["pil", "array", "tensor", "file", "junk"], weights=[5, 3, 2, 2, 1])[0]
    if kind == "pil":
        return pil_image(rng, mode)
    if kind == "array":
        return array(rng)
    if kind == "tensor":
        return tensor(rng)
    if kind == "file":
        return file(rng, folder)
    return junk(rng)


def images(rng, folder, mode, depth=0):
    """A random structure of images: one image, a list or tuple of them (nested up to 3 deep), a dict, None."""
    weights = [4, 4, 1, 1, 1] if depth < 3 else [1, 0, 0, 0, 0]
    kind = rng.choices(["one", "list", "tuple", "dict", "none"], weights=weights)
    if kind[0] == "one":
        return one_image(rng, folder, mode)
    if kind[0] == "none":
        return None, "None"
    items = [images(rng, folder, mode, depth + 1) for _ in range(rng.randint(0, 3))]
    values, descriptions = [item[0] for item in items], [item[1] for item in items]
    if kind[0] == "dict":
        return dict(enumerate(values)), "{" + ", ".join(descriptions) + "}"
    container = list if kind[0] == "list" else tuple
    return container(values), f"{kind[0]}[" + ", ".join(descriptions) + "]"


def prompt(rng):
    return "".join(rng.choice(WORDS) for _ in range(rng.randint(0, 6)))


def text(rng):
    kind = rng.choices(["one", "list", "junk"], weights=[5, 3, 1])[0]
    if kind == "one":
        return prompt(rng)
    if kind == "list":
        return [prompt(rng) for _ in range(rng.randint(1, 3))]
    return rng.choice([None, 3, b"<image>", [], ["<image>", 3], [["<image>"]], ("<image>",)])


def conversation(rng, folder, mode):
    """A random chat: random roles, string or list contents, items with and without types and images."""

    def item():
        kind = rng.choice(["text", "image", "no type", "other", "bad text", "string"])
        if kind == "text":
            return {"type": "text", "text": prompt(rng)}
        if kind == "image":
            source = rng.choice(["image", "path", None])
            return {"type": "image"} | ({source: one_image(rng, folder, mode)[0]} if source else {})
        return {"no type": {"text": "hi"}, "other": {"type": "video"}, "bad text": {"type": "text", "text": 3}}.get(
            kind, "just a string"
        )

    messages = []
    for _ in range(rng.randint(0, 4)):
        content = prompt(rng) if rng.random() < 0.4 else [item() for _ in range(rng.randint(0, 3))]
        messages.append({"role": rng.choice(["user", "assistant", "system", "user", "tool"]), "content": content})
    return messages


def check_crops(pixel_values, crops):
    assert isinstance(pixel_values, torch.Tensor) and pixel_values.shape == (crops, *CROP), pixel_values.shape
    assert bool(torch.isfinite(pixel_values).all()), "pixel_values hold NaN or inf"


def check_ids(out):
    """Ids with TOKENS image ids per crop, and finite crops."""
    assert isinstance(out, BatchFeature)
    image_ids = int((out["input_ids"] == CHAT_IMAGE_TOKEN_ID).sum())
    crops = out["pixel_values"].shape[0] if "pixel_values" in out else 0
    if crops:
        check_crops(out["pixel_values"], crops)
    assert image_ids == crops * TOKENS, (image_ids, crops)


def fuzz(calls, seed):
    """Runs `calls(rng)` -> (description, call, check) until the budget is spent; the failures, described."""
    rng = random.Random(seed)
    np.random.seed(seed)
    failures, count, start = [], 0, time.monotonic()
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        while time.monotonic() - start < BUDGET_S:
            description, call, check = calls(rng)
            count += 1
            signal.setitimer(signal.ITIMER_REAL, CALL_LIMIT_S)
            try:
                check(call())
            except (ValueError, TypeError) as error:
                if not str(error).strip():
                    failures.append(f"{description}: {type(error).__name__} with an empty message")
            except Hang:
                failures.append(f"{description}: no answer within {CALL_LIMIT_S} s")
            except Exception as error:  # noqa: BLE001 - every other exception is what this test looks for
                failures.append(f"{description}: {type(error).__name__}: {str(error)[:300]}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert count > 20, f"only {count} calls in {BUDGET_S} s"
    return failures


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return tiny_processor(tmp_path_factory.mktemp("fuzz"), "pad")


def test_the_image_processor_returns_crops_or_refuses(tmp_path):
    image_processors = {mode: TokenPackerImageProcessor(image_aspect_ratio=mode) for mode in ("pad", "slice")}

    def calls(rng):
        mode = rng.choice(["pad", "slice"])
        value, description = images(rng, tmp_path, mode)

        def check(out):
            assert isinstance(out, BatchFeature)
            grids = out["image_grids"].tolist()
            check_crops(out["pixel_values"], sum(TokenPackerImageProcessor.num_crops(*grid) for grid in grids))

        return f"{mode}: {description}", lambda: image_processors[mode](value), check

    failures = fuzz(calls, seed=0)
    assert not failures, "\n".join(failures)


def test_the_processor_returns_ids_and_crops_or_refuses(processor, tmp_path):
    def calls(rng):
        mode = rng.choice(["pad", "slice"])
        if rng.random() < 0.3:
            messages = conversation(rng, tmp_path, mode)
            tokenize = rng.random() < 0.7
            description = f"{mode} chat (tokenize={tokenize}): " + " ".join(repr(messages)[:400].split())

            def call():
                return processor.apply_chat_template(
                    messages, tokenize=tokenize, return_dict=True, processor_kwargs={"image_aspect_ratio": mode}
                )

            def check(out):
                if tokenize:
                    check_ids(out)
                else:
                    assert isinstance(out, str)

            return description, call, check
        value, description = images(rng, tmp_path, mode)
        prompts = text(rng)

        return (
            f"{mode}: images={description}, text={prompts!r}",
            lambda: processor(images=value, text=prompts, image_aspect_ratio=mode),
            check_ids,
        )

    failures = fuzz(calls, seed=1)
    assert not failures, "\n".join(failures)
