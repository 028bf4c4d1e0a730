"""Image processor for TokenPacker: LLaVA-1.5 square crops ('pad') and TokenPacker-HD crop grids ('slice')."""

import base64
import binascii
import io
import math
import os
import re
import time
import warnings
from numbers import Real

import httpx2
import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import validate_typed_dict
from huggingface_hub.errors import StrictDataclassError
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling, SizeDict
from transformers.processing_utils import ImagesKwargs, Unpack


# Candidate (h_block, w_block) grids of TokenPacker-HD per largest crop count, in the original's order (the first
# best-scoring grid wins, so the order matters; the 25 table lists (4, 6) and (6, 4) twice, as the original does).
_GRIDS_UP_TO_9 = (
    (1, 1),
    (1, 2), (2, 1),
    (1, 3), (3, 1),
    (2, 2), (1, 4), (4, 1),
    (1, 5), (5, 1),
    (1, 6), (6, 1), (2, 3), (3, 2),
    (1, 7), (7, 1),
    (4, 2), (2, 4), (1, 8), (8, 1),
    (3, 3), (1, 9), (9, 1),
)  # fmt: skip
_GRIDS_UP_TO_16 = _GRIDS_UP_TO_9 + (
    (2, 5), (5, 2),
    (2, 6), (6, 2), (3, 4), (4, 3),
    (2, 7), (7, 2),
    (3, 5), (5, 3),
    (2, 8), (8, 2), (4, 4),
)  # fmt: skip
_GRIDS_UP_TO_25 = _GRIDS_UP_TO_16 + (
    (3, 6), (6, 3), (2, 9), (9, 2),
    (4, 5), (5, 4), (2, 10), (10, 2),
    (3, 7), (7, 3),
    (11, 2), (2, 11),
    (4, 6), (6, 4), (12, 2), (2, 12), (3, 8), (8, 3), (4, 6), (6, 4),
    (5, 5),
)  # fmt: skip
SLICE_GRIDS = {9: _GRIDS_UP_TO_9, 16: _GRIDS_UP_TO_16, 25: _GRIDS_UP_TO_25}

IMAGE_ASPECT_RATIOS = ("pad", "slice")
FIXED_BY_MODE = ("do_resize", "do_center_crop", "do_pad")

# 'pad' builds the original's square canvas as is while it has at most PAD_SQUARE_MAX_PIXELS pixels or the image's
# longer side is at most PAD_SQUARE_MAX_ASPECT times its shorter one (the square then holds at most that many times
# the image's own pixels). Beyond both, a 20000x1 image would need a 20000x20000 square: the image is first reduced
# by an integer factor (box filter) until its square fits PAD_SQUARE_MAX_PIXELS.
PAD_SQUARE_MAX_PIXELS = 4096 * 4096
PAD_SQUARE_MAX_ASPECT = 4

URL_SCHEMES = ("http", "https")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def select_slice_grid(height: int, width: int, max_slices: int, block_size: tuple[int, int] = (336, 336)):
    """TokenPacker-HD's crop grid (h_block, w_block) for an image of `height` x `width` pixels.

    Every candidate grid is scored by the share of its area the aspect-kept, resized image fills, plus 0.1 times the
    IoU of the grid's box with the box of the image enlarged 1.4 times; the first best score wins. The arithmetic is
    float32 throughout, as in the original.
    """
    grids = np.array(SLICE_GRIDS[max_slices], dtype=np.int64)  # (candidates, 2)
    boxes = grids * np.array(block_size, dtype=np.int64)  # (candidates, 2) pixels (height, width)
    box_areas = (boxes[:, 0] * boxes[:, 1]).astype(np.float32)
    boxes = boxes.astype(np.float32)
    image_size = np.array([height, width], dtype=np.float32)

    scale = (boxes / image_size).min(axis=1)  # (candidates,)
    resized_area = np.round(image_size[0] * scale) * np.round(image_size[1] * scale)
    fill = resized_area / box_areas

    enlarged = image_size * np.float32(1.4)
    overlap = boxes.clip(max=enlarged)  # both boxes start at the origin
    intersection = overlap[:, 0] * overlap[:, 1]
    union = box_areas + enlarged[0] * enlarged[1] - intersection
    iou = intersection / (union + np.float32(1e-5))

    score = fill + iou * np.float32(0.1)
    best_height, best_width = SLICE_GRIDS[max_slices][int(np.argmax(score))]
    return best_height, best_width


def fit_size(height: int, width: int, target_height: int, target_width: int) -> tuple[int, int]:
    """The largest (height, width) with the image's aspect ratio that fits the target, as TokenPacker-HD rounds it.

    Sides never shrink below one pixel (the original fails on such slivers instead).
    """
    height_ratio = target_height / height
    width_ratio = target_width / width
    if height_ratio <= width_ratio:
        return target_height, max(1, min(target_width, round(width * height_ratio)))
    return max(1, min(target_height, round(height * width_ratio))), target_width


class TokenPackerImageProcessorKwargs(ImagesKwargs, total=False):
    """
    image_aspect_ratio (`str`, *optional*, defaults to `"pad"`):
        `"pad"`: one square crop per image (LLaVA-1.5). `"slice"`: a grid of crops plus a thumbnail (TokenPacker-HD).
    max_slices (`int`, *optional*, defaults to 9):
        Largest number of grid crops per image in `"slice"` mode: 9, 16 or 25.
    url_timeout (`float`, *optional*, defaults to 10):
        Seconds allowed to connect to an image URL and to wait for each read of its body; the whole download is
        also stopped once this many seconds have passed since the request started.
    max_url_bytes (`int`, *optional*, defaults to 64 MiB):
        Largest image body read from a URL, in bytes.
    """

    image_aspect_ratio: str | None
    max_slices: int | None
    url_timeout: int | float | None
    max_url_bytes: int | None


class TokenPackerImageProcessor(PilBackend):
    r"""
    Turns images into the 336x336 crops TokenPacker's vision tower reads, the way the original TokenPacker did.

    - `"pad"` (LLaVA-1.5): the RGB image is centred on a square filled with the mean colour
      (`int(m * 255)` per channel), resized so that its shortest side is `size["shortest_edge"]` (bicubic),
      centre-cropped to `crop_size`, rescaled and normalized, exactly like CLIP's image processor. One crop per image.
    - `"slice"` (TokenPacker-HD): a grid of `h_block x w_block` blocks of `crop_size` is chosen from the image's
      size (at most `max_slices` blocks); the rescaled and normalized image is resized bilinearly to fit the grid with
      its aspect ratio kept, pasted top-left on a zero canvas and cut into blocks, row by row. When there is more
      than one block, a thumbnail follows: the whole canvas resized to fit one block with the aspect ratio of the
      original image, pasted top-left on a zero block.

    Returns a `BatchFeature` with `pixel_values` (all crops of all images, 3, crop height, crop width) float32 and
    `image_grids` (images, 2) int64: the (h_block, w_block) of each image, (1, 1) in `"pad"` mode.

    Images may be PIL images, numpy arrays (height, width[, channels]) of uint8, uint16 or of floats in [0, 1], torch
    tensors (channels, height, width), file paths, http(s) URLs or `data:image/...;base64,` URIs, alone, in a list,
    or in a list of lists (one list per sample). URLs are read with a timeout (`url_timeout`) and a size cap
    (`max_url_bytes`). Images of more than 8 bits per sample are scaled to 8 bits the way a viewer shows them
    (see `to_8_bit`).
    """

    valid_kwargs = TokenPackerImageProcessorKwargs
    model_input_names = ["pixel_values", "image_grids"]

    image_aspect_ratio = "pad"
    max_slices = 9
    size = {"shortest_edge": 336}
    crop_size = {"height": 336, "width": 336}
    default_to_square = False
    resample = PILImageResampling.BICUBIC
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    do_convert_rgb = True
    url_timeout = 10.0
    max_url_bytes = 64 * 1024 * 1024

    def __init__(self, **kwargs: Unpack[TokenPackerImageProcessorKwargs]):
        super().__init__(**kwargs)
        self._validate_preprocess_kwargs(**{name: getattr(self, name) for name in self._valid_kwargs_names})

    def preprocess(self, images, **kwargs: Unpack[TokenPackerImageProcessorKwargs]) -> BatchFeature:
        """Crops of `images` (see the class docstring); keyword arguments override the stored settings."""
        try:
            validate_typed_dict(self.valid_kwargs, kwargs)
        except StrictDataclassError as error:
            raise ValueError(f"invalid image processor argument: {error}") from error
        return super().preprocess(images, **kwargs)

    @staticmethod
    def num_crops(h_block: int, w_block: int) -> int:
        """Crops an image with this grid becomes: its blocks, plus the thumbnail when there is more than one block."""
        blocks = h_block * w_block
        return blocks + 1 if blocks > 1 else blocks

    def _validate_preprocess_kwargs(
        self,
        image_aspect_ratio=None,
        max_slices=None,
        size=None,
        crop_size=None,
        resample=None,
        do_rescale=None,
        rescale_factor=None,
        do_normalize=None,
        image_mean=None,
        image_std=None,
        do_convert_rgb=None,
        url_timeout=None,
        max_url_bytes=None,
        return_tensors=None,
        **kwargs,
    ):
        if image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
            raise ValueError(f"image_aspect_ratio must be 'pad' or 'slice', got {image_aspect_ratio!r}")
        if isinstance(max_slices, bool) or max_slices not in SLICE_GRIDS:
            raise ValueError(f"max_slices must be 9, 16 or 25, got {max_slices!r}")
        if size is None or size.shortest_edge is None or any(
            getattr(size, key) is not None for key in ("height", "width", "longest_edge", "max_height", "max_width")
        ):
            raise ValueError(f"size must be {{'shortest_edge': int}}, got {_plain(size)!r}")
        if crop_size is None or crop_size.height is None or crop_size.width is None:
            raise ValueError(f"crop_size must be {{'height': int, 'width': int}}, got {_plain(crop_size)!r}")
        for name, value in (
            ("size['shortest_edge']", size.shortest_edge),
            ("crop_size['height']", crop_size.height),
            ("crop_size['width']", crop_size.width),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if resample not in set(PILImageResampling):
            raise ValueError(
                f"resample must be a PIL resampling filter ({', '.join(f.name for f in PILImageResampling)}), "
                f"got {resample!r}"
            )
        flags = {"do_rescale": do_rescale, "do_normalize": do_normalize, "do_convert_rgb": do_convert_rgb}
        for name, value in flags.items():
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        if isinstance(rescale_factor, bool) or not isinstance(rescale_factor, Real) or not rescale_factor > 0:
            raise ValueError(f"rescale_factor must be a positive number, got {rescale_factor!r}")
        for name, values in (("image_mean", image_mean), ("image_std", image_std)):
            if (
                not isinstance(values, (list, tuple))
                or len(values) != 3
                or not all(isinstance(v, Real) and not isinstance(v, bool) for v in values)
            ):
                raise ValueError(f"{name} must be three numbers (one per RGB channel), got {values!r}")
        if not all(0 <= m <= 1 for m in image_mean):
            raise ValueError(
                f"image_mean must lie in [0, 1] (the 'pad' background colour is int(m * 255)), got {image_mean!r}"
            )
        if not all(s > 0 for s in image_std):
            raise ValueError(f"image_std must be positive, got {image_std!r}")
        if isinstance(url_timeout, bool) or not isinstance(url_timeout, Real) or not 0 < url_timeout < math.inf:
            raise ValueError(f"url_timeout must be a positive number of seconds, got {url_timeout!r}")
        if isinstance(max_url_bytes, bool) or not isinstance(max_url_bytes, int) or max_url_bytes < 1:
            raise ValueError(f"max_url_bytes must be a positive integer, got {max_url_bytes!r}")
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None (torch tensors), got {return_tensors!r}")
        for name in FIXED_BY_MODE:
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"{name} is not a setting of TokenPackerImageProcessor (image_aspect_ratio decides how images are "
                    f"resized, cropped and padded), got {name}={kwargs[name]!r}"
                )

    def _prepare_images_structure(self, images, expected_ndims: int = 3) -> list:
        """A flat list of single images from one image, a list of images or a list of lists of images."""
        items = images if isinstance(images, (list, tuple)) else [images]
        flat = []
        for item in items:
            if isinstance(item, (list, tuple)):
                for image in item:
                    if isinstance(image, (list, tuple)):
                        raise ValueError("images may be nested at most two levels deep (a list of lists of images)")
                    flat.extend(_split_image_batch(image))
            else:
                flat.extend(_split_image_batch(item))
        if not flat:
            raise ValueError("expected at least one image, got an empty list")
        return flat

    def process_image(
        self,
        image,
        do_convert_rgb: bool = True,
        input_data_format=None,
        url_timeout: float | None = None,
        max_url_bytes: int | None = None,
        **kwargs,
    ) -> PIL.Image.Image:
        """One input image as an RGB PIL image: 8-bit images converted like PIL's `convert('RGB')`."""
        if isinstance(image, (str, os.PathLike)):
            image = load_image_source(
                os.fspath(image),
                self.url_timeout if url_timeout is None else url_timeout,
                self.max_url_bytes if max_url_bytes is None else max_url_bytes,
            )
        elif isinstance(image, PIL.Image.Image):
            image = _decoded_in_8_bits(image)
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu()
            image = image.float() if image.is_floating_point() else image  # numpy has no bfloat16
            image = _array_to_pil(image.numpy(), input_data_format or "channels_first")
        elif isinstance(image, np.ndarray):
            image = _array_to_pil(image, input_data_format or "channels_last")
        _check_image_size(image.width, image.height)
        if image.mode != "RGB":
            if not do_convert_rgb:
                raise ValueError(f"do_convert_rgb is False, so images must be RGB, got a {image.mode!r} image")
            image = image.convert("RGB")
        return image

    def _preprocess(
        self,
        images: list[PIL.Image.Image],
        image_aspect_ratio: str,
        max_slices: int,
        size: SizeDict,
        crop_size: SizeDict,
        resample: PILImageResampling,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: tuple[float, float, float],
        image_std: tuple[float, float, float],
        return_tensors: str | None = None,
        **kwargs,
    ) -> BatchFeature:
        lookup = _pixel_lookup_table(do_rescale, rescale_factor, do_normalize, image_mean, image_std)
        block_size = (crop_size.height, crop_size.width)
        if image_aspect_ratio == "pad":
            grids = [(1, 1)] * len(images)
        else:
            grids = [select_slice_grid(image.height, image.width, max_slices, block_size) for image in images]
        crop_counts = [self.num_crops(*grid) for grid in grids]
        pixel_values = torch.empty(sum(crop_counts), 3, *block_size)  # every crop is written below
        background = tuple(int(m * 255) for m in image_mean)  # LLaVA-1.5's padding colour: (122, 116, 104) for CLIP
        for image, grid, crops in zip(images, grids, pixel_values.split(crop_counts)):
            if image_aspect_ratio == "pad":
                self._write_pad_crop(crops[0], image, background, size, crop_size, resample, lookup)
            else:
                _write_slice_crops(crops, np.asarray(image), grid, lookup)
        data = {"pixel_values": pixel_values, "image_grids": torch.tensor(grids, dtype=torch.long)}
        if return_tensors == "np":
            data = {key: value.numpy() for key, value in data.items()}
        return BatchFeature(data=data)

    def _write_pad_crop(self, out: torch.Tensor, image, background, size, crop_size, resample, lookup):
        """LLaVA-1.5: centre the image on a square of the background colour, then CLIP's resize and centre crop."""
        side = size.shortest_edge  # the square's shortest side is every side
        square = expand_to_square(reduce_for_square(image), background).resize((side, side), resample=resample)
        crop = self.center_crop(np.asarray(square).transpose(2, 0, 1), crop_size)  # (3, crop height, crop width)
        _apply_lookup(lookup, crop, out.numpy())


def _write_slice_crops(out: torch.Tensor, image: np.ndarray, grid: tuple[int, int], lookup: np.ndarray):
    """TokenPacker-HD into `out` (crops, 3, block height, block width): the blocks row by row, then the thumbnail."""
    height, width = image.shape[:2]
    (h_block, w_block), (block_height, block_width) = grid, out.shape[-2:]
    pixels = torch.from_numpy(_apply_lookup(lookup, image.transpose(2, 0, 1)))  # (3, height, width)

    canvas = _resize_onto_zeros(pixels, (height, width), (block_height * h_block, block_width * w_block))
    blocks = canvas.view(3, h_block, block_height, w_block, block_width).permute(1, 3, 0, 2, 4)
    out[: h_block * w_block].view(h_block, w_block, 3, block_height, block_width).copy_(blocks)
    if h_block * w_block > 1:
        # The thumbnail squeezes the padded canvas with the original image's aspect ratio (the released weights
        # were trained on it).
        out[-1] = _resize_onto_zeros(canvas, (height, width), (block_height, block_width))


def expand_to_square(image: PIL.Image.Image, background: tuple[int, int, int]) -> PIL.Image.Image:
    """LLaVA-1.5's expand2square: the image centred on a square of the `background` colour."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = PIL.Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def reduce_for_square(image: PIL.Image.Image) -> PIL.Image.Image:
    """`image` as is when its 'pad' square is within bounds, else box-reduced so that the square fits.

    See PAD_SQUARE_MAX_PIXELS: only images whose longer side is beyond both bounds change. Their crops then differ
    slightly from the original's, which would resize the full square with one bicubic filter.
    """
    longer, shorter = max(image.size), min(image.size)
    if longer * longer <= PAD_SQUARE_MAX_PIXELS or longer <= PAD_SQUARE_MAX_ASPECT * shorter:
        return image
    return image.reduce(math.ceil(longer / math.isqrt(PAD_SQUARE_MAX_PIXELS)))


def _resize_onto_zeros(pixels: torch.Tensor, image_size, target_size) -> torch.Tensor:
    """Bilinear resize of (3, h, w) to fit `target_size` with `image_size`'s aspect, top-left on zeros."""
    fitted_height, fitted_width = fit_size(*image_size, *target_size)
    resized = pixels
    if (fitted_height, fitted_width) != pixels.shape[-2:]:  # a same-size bilinear resize is the identity
        resized = F.interpolate(pixels[None], size=(fitted_height, fitted_width), mode="bilinear", align_corners=False)
        resized = resized[0]
    if (fitted_height, fitted_width) == tuple(target_size):
        return resized
    canvas = torch.zeros(3, *target_size)
    canvas[:, :fitted_height, :fitted_width] = resized
    return canvas


def _pixel_lookup_table(do_rescale, rescale_factor, do_normalize, image_mean, image_std) -> np.ndarray:
    """(3, 256) float32: each channel's value for every 8-bit level, rescaled and normalized in float32."""
    levels = np.arange(256, dtype=np.float64)
    levels = (levels * rescale_factor if do_rescale else levels).astype(np.float32)
    table = np.repeat(levels[None], 3, axis=0)
    if do_normalize:
        mean = np.array(image_mean, dtype=np.float32)[:, None]
        std = np.array(image_std, dtype=np.float32)[:, None]
        table = (table - mean) / std
    return table


def _apply_lookup(table: np.ndarray, image: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """(3, h, w) uint8 -> (3, h, w) float32 through the per-channel lookup table, into `out` when given."""
    out = np.empty(image.shape, dtype=np.float32) if out is None else out
    for channel in range(3):
        np.take(table[channel], image[channel], out=out[channel])
    return out


def _split_image_batch(image) -> list:
    """A 4D array or tensor is a batch of images; anything else is one image (checked later)."""
    if isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 4:
        return list(image)
    if not isinstance(image, (PIL.Image.Image, np.ndarray, torch.Tensor, str, os.PathLike)):
        raise TypeError(
            "images must be PIL images, numpy arrays, torch tensors, file paths or URLs (alone, in a list or in a "
            f"list of lists), got {type(image).__name__}"
        )
    return [image]


def _check_image_size(width: int, height: int):
    if width == 0 or height == 0:
        raise ValueError(f"image has zero size: got {width}x{height} (width x height)")
    limit = PIL.Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise ValueError(
            f"image of {width}x{height} = {width * height} pixels is beyond PIL's decompression-bomb limit "
            f"(PIL.Image.MAX_IMAGE_PIXELS = {limit})"
        )


def load_image_source(source: str, url_timeout: float, max_url_bytes: int) -> PIL.Image.Image:
    """The image at a file path, an http(s) URL or a `data:image/...;base64,` URI, upright (EXIF) and in 8 bits.

    Any other string is a file path: base64 is decoded only from data URIs.
    """
    if source.startswith("data:") and not os.path.exists(source):
        return _decode_image(io.BytesIO(_data_uri_bytes(source)), f"the data URI {_shorten(source, 60)!r}")
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", source)
    if scheme is not None:
        if scheme.group(1).lower() not in URL_SCHEMES:
            raise ValueError(f"image URLs must be http or https, got {_shorten(source)!r}")
        body, content_type = fetch_url_bytes(source, url_timeout, max_url_bytes)
        return _decode_image(io.BytesIO(body), source, url_content_type=content_type)
    if os.path.isdir(source):
        raise ValueError(f"{_shorten(source)!r} is a directory, not an image file")
    if not os.path.exists(source):
        raise ValueError(
            f"image file {_shorten(source)!r} does not exist (images given as strings are file paths, http(s) URLs "
            "or data:image/...;base64, URIs)"
        )
    return _decode_image(source, repr(_shorten(source)))


def fetch_url_bytes(url: str, timeout: float, max_bytes: int) -> tuple[bytes, str]:
    """The body and content type of an http(s) URL, read within `timeout` seconds and at most `max_bytes` bytes."""
    shown = _shorten(url)
    deadline = time.monotonic() + timeout
    try:
        with httpx2.stream("GET", url, timeout=timeout, follow_redirects=True) as response:
            if not response.is_success:
                raise ValueError(f"HTTP {response.status_code} {response.reason_phrase} for image URL {shown}")
            length = response.headers.get("content-length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise ValueError(
                    f"image URL {shown} is too large: {int(length)} bytes, more than max_url_bytes = {max_bytes}"
                )
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > max_bytes:
                    raise ValueError(f"image URL {shown} is too large: more than max_url_bytes = {max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise ValueError(f"image URL {shown} took longer than url_timeout = {timeout} s to download")
            return bytes(body), response.headers.get("content-type", "no content type")
    except httpx2.TimeoutException as error:
        raise ValueError(
            f"image URL {shown} did not answer within url_timeout = {timeout} s ({type(error).__name__})"
        ) from error
    except httpx2.ConnectError as error:
        raise ValueError(f"could not connect to image URL {shown}: {error}") from error
    except (httpx2.HTTPError, httpx2.InvalidURL) as error:
        raise ValueError(f"could not fetch image URL {shown}: {type(error).__name__}: {error}") from error


def _data_uri_bytes(uri: str) -> bytes:
    """The decoded bytes of a `data:image/...;base64,` URI."""
    header, comma, payload = uri.partition(",")
    if not comma or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ValueError(f"data URIs must start with 'data:image/<format>;base64,', got {_shorten(uri, 60)!r}")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as error:
        raise ValueError(f"the data URI {_shorten(uri, 60)!r} holds invalid base64: {error}") from error


def _decode_image(file, name: str, url_content_type: str | None = None) -> PIL.Image.Image:
    """Decodes a file or stream into an upright 8-bit image; `name` says where it came from in errors."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(file) as opened:
                bits = _stored_bits(opened)
                opened.load()
                image = PIL.ImageOps.exif_transpose(opened)
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as error:
        raise ValueError(f"image {name} is beyond PIL's decompression-bomb limit: {error}") from error
    except PIL.UnidentifiedImageError as error:
        if url_content_type is None:
            raise ValueError(f"could not read an image from {name}: {error}") from error
        raise ValueError(
            f"the content at {name} is not an image (content type {url_content_type}; PIL cannot identify it)"
        ) from error
    except Exception as error:  # decoders of malformed files raise OSError, SyntaxError, struct.error, EOFError, ...
        raise ValueError(f"could not read an image from {name}: {type(error).__name__}: {error}") from error
    return to_8_bit(image, bits)


def _decoded_in_8_bits(image: PIL.Image.Image) -> PIL.Image.Image:
    """A given PIL image decoded (PIL opens files lazily) and in 8 bits."""
    bits = _stored_bits(image)
    try:
        image.load()
    except Exception as error:  # as in _decode_image
        raise ValueError(f"could not read the given PIL image: {type(error).__name__}: {error}") from error
    return to_8_bit(image, bits)


def _stored_bits(image: PIL.Image.Image) -> int | None:
    """16 when a not yet decoded image is stored with 16-bit samples (some Pillows open 16-bit PNGs as mode I)."""
    for tile in getattr(image, "tile", None) or ():
        args = tile[3]
        rawmode = args[0] if isinstance(args, tuple) and args else args
        if isinstance(rawmode, str) and rawmode.startswith("I;16"):
            return 16
    return None


def to_8_bit(image: PIL.Image.Image, bits: int | None = None) -> PIL.Image.Image:
    """`image` with 8 bits per sample, scaled as a viewer shows it (PIL's `convert` would clip everything at 255).

    16-bit images (mode I;16, or `bits` = 16 as a file stores them) are scaled by 255 / 65535. Other 32-bit integer
    (I) and float (F) images are read by their range: floats within [0, 1] are scaled by 255, values within [0, 255]
    are kept and converted by PIL, values within [0, 65535] are 16-bit, and any other range is stretched from its
    minimum (black) to its maximum (white); a constant image out of these ranges is black. Other modes are returned
    as they are.
    """
    if image.mode not in SIXTEEN_BIT_MODES + ("I", "F"):
        return image
    bits = _stored_bits(image) if bits is None else bits
    values = np.asarray(image).astype(np.float64)
    if image.mode in SIXTEEN_BIT_MODES or bits == 16:
        scaled = values.clip(0, 65535) / 257
    else:
        if not np.isfinite(values).all():
            raise ValueError("float images must hold finite values, got NaN or infinity")
        low, high = float(values.min()), float(values.max())
        if image.mode == "F" and 0 <= low and high <= 1:
            scaled = values * 255
        elif 0 <= low and high <= 255:
            return image
        elif 0 <= low and high <= 65535:
            scaled = values / 257
        else:
            scaled = (values - low) * (255 / (high - low) if high > low else 0)
    return PIL.Image.fromarray(np.rint(scaled).astype(np.uint8), "L")


def _array_to_pil(array: np.ndarray, layout: str) -> PIL.Image.Image:
    """An array (h, w), (h, w, c) or (c, h, w) with 1-4 channels as a PIL image (L, LA, RGB or RGBA)."""
    if layout not in ("channels_first", "channels_last"):
        raise ValueError(f"input_data_format must be 'channels_first' or 'channels_last', got {layout!r}")
    if array.ndim == 3:
        channels_first = array.shape[0] in (1, 2, 3, 4) and (
            layout == "channels_first" or array.shape[-1] not in (1, 2, 3, 4)
        )
        if channels_first:
            array = np.moveaxis(array, 0, -1)
        if array.shape[-1] not in (1, 2, 3, 4):
            raise ValueError(
                f"image arrays need 1 to 4 channels first or last (height, width, channels), got shape {array.shape}"
            )
        if array.shape[-1] == 1:
            array = array[..., 0]
    elif array.ndim != 2:
        raise ValueError(
            f"image arrays must be (height, width), (height, width, channels) or (channels, height, width), "
            f"or a 4D batch of those, got shape {array.shape}"
        )
    _check_image_size(array.shape[1], array.shape[0])
    return PIL.Image.fromarray(np.ascontiguousarray(_to_uint8(array)))  # L, LA, RGB or RGBA by channel count


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """uint8 as is, uint16 scaled by 255 / 65535, other integers in [0, 255] cast, floats in [0, 1] scaled by 255."""
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind == "u" and array.dtype.itemsize == 2:
        return np.rint(array / 257).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"integer image arrays must hold values in [0, 255], got [{low}, {high}] (16-bit images: pass uint16)"
            )
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        low, high = float(array.min()), float(array.max())
        if not (0 <= low and high <= 1):
            raise ValueError(
                f"float image arrays must hold values in [0, 1] (pass uint8 for 0-255 images), got [{low}, {high}]"
            )
        return np.rint(array.astype(np.float64) * 255).astype(np.uint8)
    raise ValueError(f"image arrays must be uint8, integer or float, got dtype {array.dtype}")


def _shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _plain(size):
    return None if size is None else {key: value for key, value in dict(size).items() if value is not None}


__all__ = ["TokenPackerImageProcessor", "fit_size", "select_slice_grid"]
