"""TokenPackerImageProcessor against independent references of TOKENPACKER.md sections 2 ('pad') and 3 ('slice')."""

import http.server
import json
import threading
from functools import partial

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoImageProcessor

from tokenpacker import TokenPackerImageProcessor, export_remote_code
from tokenpacker.processing.image_processing_tokenpacker import select_slice_grid
from tokenpacker.testing import photo, reference_grids, reference_pad, reference_slice

def test_pad_background_is_the_clip_mean_colour():
    assert tuple(int(m * 255) for m in TokenPackerImageProcessor().image_mean) == (122, 116, 104)


@pytest.mark.parametrize(
    "height, width",
    [(480, 640), (640, 480), (336, 336), (100, 1000), (1000, 100), (37, 53), (1, 500), (333, 334), (1, 1), (900, 899)],
)
def test_pad_equals_clip_processor_on_the_expanded_image(height, width):
    image = photo(height, width, seed=height + width)
    outputs = TokenPackerImageProcessor()(image)
    assert outputs["pixel_values"].dtype == torch.float32
    assert torch.equal(outputs["pixel_values"], reference_pad(image))
    assert outputs["image_grids"].tolist() == [[1, 1]]
    assert outputs["image_grids"].dtype == torch.long


def test_pad_batches_keep_input_order_from_flat_lists_and_lists_of_lists():
    images = [photo(200, 300, seed=1), photo(300, 200, seed=2), photo(250, 250, seed=3)]
    processor = TokenPackerImageProcessor()
    expected = torch.cat([reference_pad(image) for image in images])
    flat = processor(images)
    nested = processor([[images[0]], [], [images[1], images[2]]])
    for outputs in (flat, nested):
        assert torch.equal(outputs["pixel_values"], expected)
        assert outputs["image_grids"].tolist() == [[1, 1]] * 3


def test_numpy_outputs_on_request():
    outputs = TokenPackerImageProcessor()(photo(50, 80), return_tensors="np")
    assert isinstance(outputs["pixel_values"], np.ndarray) and outputs["pixel_values"].dtype == np.float32
    assert np.array_equal(outputs["pixel_values"], reference_pad(photo(50, 80)).numpy())
    assert outputs["image_grids"].tolist() == [[1, 1]]


# --- inputs ------------------------------------------------------------------------------------------------------


def as_array(image):
    return np.asarray(image)


@pytest.mark.parametrize(
    "convert",
    [
        pytest.param(as_array, id="numpy-hwc-uint8"),
        pytest.param(lambda image: as_array(image).astype(np.float32) / 255, id="numpy-hwc-float"),
        pytest.param(lambda image: np.ascontiguousarray(as_array(image).transpose(2, 0, 1)), id="numpy-chw-uint8"),
        pytest.param(lambda image: torch.from_numpy(as_array(image).transpose(2, 0, 1).copy()), id="torch-chw-uint8"),
        pytest.param(lambda image: torch.from_numpy(as_array(image).transpose(2, 0, 1) / 255), id="torch-chw-float"),
        pytest.param(lambda image: as_array(image).astype(np.int64), id="numpy-int64"),
    ],
)
def test_arrays_and_tensors_give_the_same_crops_as_the_pil_image(convert):
    image = photo(120, 90, seed=5)
    expected = reference_pad(image)
    for mode in ("pad", "slice"):
        processor = TokenPackerImageProcessor(image_aspect_ratio=mode)
        assert torch.equal(processor(convert(image))["pixel_values"], processor(image)["pixel_values"])
    assert torch.equal(TokenPackerImageProcessor()(convert(image))["pixel_values"], expected)


def test_a_4d_array_is_a_batch_of_images():
    images = [photo(60, 70, seed=s) for s in range(3)]
    batch = np.stack([as_array(image) for image in images])  # (3, 60, 70, 3)
    outputs = TokenPackerImageProcessor()(batch)
    assert torch.equal(outputs["pixel_values"], torch.cat([reference_pad(image) for image in images]))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "CMYK", "I;16", "1", "I", "F"])
def test_every_mode_becomes_rgb_like_pil_convert(mode):
    rgb = photo(90, 130, seed=7)
    expected = None
    if mode == "I;16":  # 16-bit samples are scaled to 8 bits (PIL's convert would clip them at 255)
        image = PIL.Image.fromarray(as_array(rgb.convert("L")).astype(np.uint16) * 257)
        expected = rgb.convert("L").convert("RGB")
    elif mode == "RGBA":
        alpha = PIL.Image.fromarray(np.arange(90 * 130, dtype=np.uint8).reshape(90, 130), "L")
        image = rgb.copy()
        image.putalpha(alpha)
    else:
        image = rgb.convert(mode)
    assert image.mode == mode
    expected = image.convert("RGB") if expected is None else expected
    for aspect in ("pad", "slice"):
        processor = TokenPackerImageProcessor(image_aspect_ratio=aspect)
        assert torch.equal(processor(image)["pixel_values"], processor(expected)["pixel_values"])


@pytest.mark.parametrize(
    "array, pil_mode",
    [
        (np.arange(40 * 30, dtype=np.uint8).reshape(40, 30), "L"),
        (np.arange(40 * 30 * 2, dtype=np.uint8).reshape(40, 30, 2), "LA"),
        (np.arange(40 * 30 * 4, dtype=np.uint8).reshape(40, 30, 4), "RGBA"),
    ],
)
def test_gray_and_alpha_arrays_convert_like_their_pil_mode(array, pil_mode):
    processor = TokenPackerImageProcessor()
    expected = processor(PIL.Image.fromarray(array, pil_mode).convert("RGB"))["pixel_values"]
    assert torch.equal(processor(array)["pixel_values"], expected)


def test_files_and_paths_load_like_the_pil_image(tmp_path):
    image = photo(77, 150, seed=9)
    image.save(tmp_path / "photo.png")
    processor = TokenPackerImageProcessor()
    expected = reference_pad(image)
    assert torch.equal(processor(str(tmp_path / "photo.png"))["pixel_values"], expected)
    assert torch.equal(processor(tmp_path / "photo.png")["pixel_values"], expected)


def test_urls_load_like_the_pil_image(tmp_path):
    image = photo(64, 48, seed=11)
    image.save(tmp_path / "photo.png")
    handler = partial(QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/photo.png"
        outputs = TokenPackerImageProcessor()(url)
    finally:
        server.shutdown()
        server.server_close()
    assert torch.equal(outputs["pixel_values"], reference_pad(image))


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


# --- bad inputs --------------------------------------------------------------------------------------------------


def test_corrupt_and_empty_files_are_refused_by_name(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    processor = TokenPackerImageProcessor()
    for path in (corrupt, empty):
        with pytest.raises(ValueError, match=f"could not read an image from '{path}'"):
            processor(str(path))


def test_truncated_files_are_refused(tmp_path):
    path = tmp_path / "truncated.png"
    photo(100, 100).save(path)
    path.write_bytes(path.read_bytes()[:400])
    with pytest.raises(ValueError, match="could not read an image from"):
        TokenPackerImageProcessor()(str(path))


@pytest.mark.parametrize(
    "image",
    [
        pytest.param(PIL.Image.new("RGB", (0, 10)), id="pil"),
        pytest.param(np.zeros((10, 0, 3), dtype=np.uint8), id="numpy"),
        pytest.param(torch.zeros(3, 0, 5, dtype=torch.uint8), id="torch"),
    ],
)
def test_zero_sized_images_are_refused(image):
    with pytest.raises(ValueError, match="image has zero size"):
        TokenPackerImageProcessor()(image)


@pytest.mark.parametrize("pixels", [1000, 1200])  # PIL warns above the limit and fails above twice the limit
def test_images_beyond_the_decompression_bomb_limit_are_refused(tmp_path, monkeypatch, pixels):
    path = tmp_path / "big.png"
    photo(25, 40).save(path)  # 1000 pixels
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", pixels // 2 if pixels == 1200 else pixels - 1)
    processor = TokenPackerImageProcessor()
    with pytest.raises(ValueError, match="beyond PIL's decompression-bomb limit"):
        processor(str(path))
    with pytest.raises(ValueError, match="40x25 = 1000 pixels is beyond PIL's decompression-bomb limit"):
        processor(photo(25, 40))


def test_images_at_the_limit_pass(monkeypatch):
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)
    assert TokenPackerImageProcessor()(photo(25, 40))["pixel_values"].shape == (1, 3, 336, 336)


@pytest.mark.parametrize("images", [3, {"image": 1}, None, [photo(10, 10), 2.5], b"bytes"])
def test_wrong_types_are_refused(images):
    with pytest.raises(TypeError, match="images must be PIL images, numpy arrays, torch tensors, file paths or URLs"):
        TokenPackerImageProcessor()(images)


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros(10, dtype=np.uint8), r"got shape \(10,\)"),
        (np.zeros((2, 3, 4, 5, 6), dtype=np.uint8), r"got shape \(2, 3, 4, 5, 6\)"),
        (np.zeros((10, 12, 5), dtype=np.uint8), r"1 to 4 channels first or last .* got shape \(10, 12, 5\)"),
        (torch.zeros(6, 10, 12), r"1 to 4 channels first or last .* got shape \(6, 10, 12\)"),
        (np.full((4, 4, 3), 1.5, dtype=np.float32), r"values in \[0, 1\] .* got \[1.5, 1.5\]"),
        (np.full((4, 4, 3), 300, dtype=np.int32), r"values in \[0, 255\], got \[300, 300\]"),
        (np.zeros((4, 4, 3), dtype=bool), "must be uint8, integer or float, got dtype bool"),
        ([[[photo(5, 5)]]], "at most two levels deep"),
        ([], "expected at least one image"),
    ],
)
def test_wrong_arrays_and_structures_are_refused(image, message):
    with pytest.raises(ValueError, match=message):
        TokenPackerImageProcessor()(image)


def test_without_rgb_conversion_non_rgb_images_are_refused():
    with pytest.raises(ValueError, match="do_convert_rgb is False, so images must be RGB, got a 'L' image"):
        TokenPackerImageProcessor(do_convert_rgb=False)(photo(10, 10).convert("L"))
    image = photo(10, 10)
    assert torch.equal(TokenPackerImageProcessor(do_convert_rgb=False)(image)["pixel_values"], reference_pad(image))


# --- settings ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"image_aspect_ratio": "anyres"}, "image_aspect_ratio must be 'pad' or 'slice', got 'anyres'"),
        ({"max_slices": 12}, "max_slices must be 9, 16 or 25, got 12"),
        ({"max_slices": True}, "max_slices must be 9, 16 or 25, got True"),
        ({"crop_size": {"shortest_edge": 336}}, "crop_size must be {'height': int, 'width': int}"),
        ({"crop_size": {"height": 0, "width": 336}}, r"crop_size\['height'\] must be a positive integer, got 0"),
        ({"size": {"height": 336, "width": 336}}, "size must be {'shortest_edge': int}"),
        ({"size": {"shortest_edge": -1}}, r"size\['shortest_edge'\] must be a positive integer, got -1"),
        ({"resample": 42}, "resample must be a PIL resampling filter .* got 42"),
        ({"do_rescale": "yes"}, "do_rescale must be True or False, got 'yes'"),
        ({"rescale_factor": 0.0}, "rescale_factor must be a positive number, got 0.0"),
        ({"image_mean": (0.5, 0.5)}, r"image_mean must be three numbers .* got \(0.5, 0.5\)"),
        ({"image_mean": (0.5, 2.0, 0.5)}, r"image_mean must lie in \[0, 1\]"),
        ({"image_std": (0.5, 0.0, 0.5)}, "image_std must be positive"),
        ({"do_resize": False}, "do_resize is not a setting of TokenPackerImageProcessor"),
        ({"do_pad": True}, "do_pad is not a setting of TokenPackerImageProcessor"),
    ],
)
def test_bad_settings_are_refused_at_construction_and_per_call(settings, message):
    with pytest.raises(ValueError, match=message):
        TokenPackerImageProcessor(**settings)
    (name,) = settings
    with pytest.raises(ValueError, match=name):
        TokenPackerImageProcessor()(photo(10, 10), **settings)


def test_bad_return_tensors_are_refused():
    with pytest.raises(ValueError, match="return_tensors must be 'pt', 'np' or None"):
        TokenPackerImageProcessor()(photo(10, 10), return_tensors="jax")


def test_num_crops_counts_blocks_and_the_thumbnail():
    assert TokenPackerImageProcessor.num_crops(1, 1) == 1
    assert TokenPackerImageProcessor.num_crops(1, 2) == 3
    assert TokenPackerImageProcessor.num_crops(3, 3) == 10
    assert TokenPackerImageProcessor.num_crops(4, 4) == 17


def test_save_and_load_round_trip_through_auto_image_processor(tmp_path):
    processor = TokenPackerImageProcessor(image_aspect_ratio="slice", max_slices=16)
    processor.save_pretrained(tmp_path)
    assert "auto_map" not in json.loads((tmp_path / "preprocessor_config.json").read_text())
    export_remote_code(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "TokenPackerImageProcessor"
    assert saved["image_aspect_ratio"] == "slice" and saved["max_slices"] == 16
    assert saved["auto_map"]["AutoImageProcessor"] == "image_processing_tokenpacker.TokenPackerImageProcessor"
    for loaded in (TokenPackerImageProcessor.from_pretrained(tmp_path), AutoImageProcessor.from_pretrained(tmp_path)):
        assert type(loaded) is TokenPackerImageProcessor
        settings = loaded.to_dict()
        assert settings.pop("auto_map") == saved["auto_map"]
        assert settings == processor.to_dict()
        image = photo(500, 900)
        assert torch.equal(loaded(image)["pixel_values"], processor(image)["pixel_values"])


def test_auto_image_processor_maps_the_tokenpacker_config():
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING

    from tokenpacker import TokenPackerConfig

    assert IMAGE_PROCESSOR_MAPPING[TokenPackerConfig]["pil"] is TokenPackerImageProcessor


def test_per_call_settings_override_the_stored_ones():
    processor = TokenPackerImageProcessor()
    image = photo(700, 1400)
    per_call = processor(image, image_aspect_ratio="slice", max_slices=16)
    stored = TokenPackerImageProcessor(image_aspect_ratio="slice", max_slices=16)(image)
    assert torch.equal(per_call["pixel_values"], stored["pixel_values"])
    assert torch.equal(per_call["image_grids"], stored["image_grids"])
    assert processor.image_aspect_ratio == "pad"


SWEEP = sorted(
    set(range(1, 41))
    | set(range(41, 4001, 37))
    | {336 * k + d for k in range(1, 13) for d in (-1, 0, 1)}
    | {3000, 4000}
)


@pytest.mark.parametrize("max_slices", [9, 16, 25])
def test_slice_grid_equals_the_reference_over_a_broad_sweep(max_slices):
    heights = [h for h in SWEEP for _ in SWEEP]
    widths = [w for _ in SWEEP for w in SWEEP]
    expected = reference_grids(heights, widths, max_slices)
    assert (1, 3000) in zip(heights, widths) and (3000, 1) in zip(heights, widths)
    chosen = [select_slice_grid(h, w, max_slices) for h, w in zip(heights, widths)]
    mismatches = [(h, w, want, got) for h, w, want, got in zip(heights, widths, expected, chosen) if want != got]
    assert mismatches == []
    assert len(set(expected)) > 10  # the sweep reaches many different grids


SLICE_IMAGES = [(1344, 1344), (480, 640), (1000, 300), (37, 2000), (5, 7), (2500, 40), (336, 336), (700, 1400)]


@pytest.mark.parametrize("max_slices", [9, 16, 25])
def test_slice_pixels_equal_the_reference(max_slices):
    images = [photo(h, w, seed=h * w % 97) for h, w in SLICE_IMAGES]
    outputs = TokenPackerImageProcessor(image_aspect_ratio="slice", max_slices=max_slices)(images)
    expected = [reference_slice(image, max_slices) for image in images]
    assert outputs["image_grids"].tolist() == [list(grid) for _, grid in expected]
    assert outputs["pixel_values"].dtype == torch.float32
    torch.testing.assert_close(outputs["pixel_values"], torch.cat([crops for crops, _ in expected]), rtol=0, atol=1e-6)


def test_slice_crop_counts_follow_the_grids():
    images = [photo(h, w) for h, w in SLICE_IMAGES]
    outputs = TokenPackerImageProcessor(image_aspect_ratio="slice", max_slices=16)(images)
    counts = [TokenPackerImageProcessor.num_crops(*grid) for grid in outputs["image_grids"].tolist()]
    assert outputs["pixel_values"].shape == (sum(counts), 3, 336, 336)
    assert 1 in counts and max(counts) > 10  # single-block images have no thumbnail


def test_slice_with_another_block_size_uses_it_for_grid_blocks_and_thumbnail():
    image = photo(700, 500, seed=4)
    processor = TokenPackerImageProcessor(image_aspect_ratio="slice", crop_size={"height": 224, "width": 224})
    outputs = processor(image)
    crops, grid = reference_slice(image, 9, block=224)
    assert outputs["image_grids"].tolist() == [list(grid)]
    torch.testing.assert_close(outputs["pixel_values"], crops, rtol=0, atol=1e-6)


def test_input_data_format_settles_ambiguous_array_layouts():
    hwc = np.arange(3 * 4 * 3, dtype=np.uint8).reshape(3, 4, 3)  # 3 rows, 4 columns, RGB; also a valid (C, H, W)
    processor = TokenPackerImageProcessor()
    expected = processor(PIL.Image.fromarray(hwc))["pixel_values"]
    assert torch.equal(processor(hwc)["pixel_values"], expected)
    chw = np.ascontiguousarray(hwc.transpose(2, 0, 1))  # (3, 3, 4): channels first and last both plausible
    assert torch.equal(processor(chw, input_data_format="channels_first")["pixel_values"], expected)
    assert torch.equal(processor(torch.from_numpy(chw))["pixel_values"], expected)
