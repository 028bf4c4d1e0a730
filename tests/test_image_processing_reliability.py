"""TokenPackerImageProcessor on hard inputs: extreme aspect ratios, deep images, unreliable URLs and bad sources."""

import base64
import contextlib
import http.server
import io
import json
import math
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import PIL.Image
import pytest
import torch

from tokenpacker import TokenPackerImageProcessor

from .builders import tiny_processor
from tokenpacker.testing import CLIP_STD, photo, reference_pad

LEVEL = 1 / (255 * torch.tensor(CLIP_STD)[:, None, None])  # one 8-bit level after normalization, per channel


def levels_apart(actual, expected):
    """Largest difference of two normalized crops, in 8-bit levels."""
    return ((actual - expected) / LEVEL).abs().max().item()


# --- 'pad' on extreme aspect ratios -------------------------------------------------------------------------------

PEAK_MEMORY_SCRIPT = """
import json, resource, sys
import numpy as np, PIL.Image
from tokenpacker import TokenPackerImageProcessor

processor = TokenPackerImageProcessor()
processor(PIL.Image.new("RGB", (40, 30)))  # allocations of the first call are not the image's
results = []
for width, path in zip(sys.argv[1::2], sys.argv[2::2]):
    PIL.Image.fromarray(np.full((1, int(width), 3), (250, 10, 10), dtype=np.uint8)).save(path)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pixels = processor(path)["pixel_values"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    results.append({"peak_mib": peak / 1024, "shape": list(pixels.shape), "finite": bool(pixels.isfinite().all())})
print(json.dumps(results))
"""


def test_pad_of_one_pixel_high_images_needs_little_memory(tmp_path):
    """A 138-byte 20000x1 PNG used to build a 20000x20000 square (1.6 GB); 60000x1 ran out of memory."""
    arguments = []
    for width in (20000, 60000):
        arguments += [str(width), str(tmp_path / f"line-{width}.png")]
    result = subprocess.run(
        [sys.executable, "-c", PEAK_MEMORY_SCRIPT, *arguments], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for width, measured in zip((20000, 60000), json.loads(result.stdout.splitlines()[-1])):
        assert (tmp_path / f"line-{width}.png").stat().st_size < 1000
        assert measured["shape"] == [1, 3, 336, 336] and measured["finite"]
        assert measured["peak_mib"] < 150, (width, measured)


@pytest.mark.parametrize(
    "height, width",
    [(1, 4096), (4096, 3), (1100, 4400), (2600, 4500), (480, 640), (1, 1), (77, 2000)],
    ids=["1x4096", "4096x3", "aspect-4", "beyond-4096-aspect-1.7", "photo", "1x1", "77x2000"],
)
def test_pad_of_normal_images_is_the_original_bit_for_bit(height, width):
    """Squares up to 4096x4096, or of images up to 4:1, are built as the original did (LLaVA-1.5's expand2square)."""
    image = photo(height, width, seed=3)
    assert torch.equal(TokenPackerImageProcessor()(image)["pixel_values"], reference_pad(image))


@pytest.mark.parametrize("height, width", [(50, 5000), (5000, 50), (1, 9000), (3, 4097)])
def test_pad_of_extreme_images_reduces_them_first_and_stays_close_to_the_original(height, width):
    image = photo(height, width, seed=8)
    outputs = TokenPackerImageProcessor()(image)["pixel_values"]
    factor = math.ceil(max(height, width) / 4096)  # the smallest integer factor whose square fits 4096x4096
    assert factor > 1
    assert torch.equal(outputs, reference_pad(image.reduce(factor)))
    exact = reference_pad(image)  # the original's full square: still affordable at these sizes
    assert levels_apart(outputs, exact) <= 16  # at the sharpest edges of the photo; most pixels are equal
    assert ((outputs - exact) / LEVEL).abs().mean().item() < 0.1


def test_pad_of_a_line_keeps_its_colour_faintly_on_the_background():
    line = PIL.Image.new("RGB", (20000, 3), (250, 10, 10))
    outputs = TokenPackerImageProcessor()(line)["pixel_values"][0]
    background = reference_pad(PIL.Image.new("RGB", (20, 20), (122, 116, 104)))[0]
    assert torch.equal(outputs[:, :100], background[:, :100])  # far from the line: the mean colour
    middle = outputs[:, 160:176]
    assert (middle[0] > background[0, 160:176]).any() and (middle[1] < background[1, 160:176]).any()


# --- images of more than 8 bits per sample --------------------------------------------------------------------------


def gradient_16_bit(height=200, width=300):
    """A smooth 16-bit gradient using the whole 0..65535 range, with values between 8-bit levels."""
    ys, xs = np.mgrid[0:height, 0:width]
    return ((xs * 0.7 + ys * 0.3) / (width * 0.7 + height * 0.3) * 65535).astype(np.uint16)


@pytest.mark.parametrize("mode", ["pad", "slice"])
def test_a_16_bit_png_gives_the_crops_of_its_8_bit_version(tmp_path, mode):
    values = gradient_16_bit()
    PIL.Image.fromarray(values).save(tmp_path / "deep.png")
    assert PIL.Image.open(tmp_path / "deep.png").mode in ("I;16", "I")
    processor = TokenPackerImageProcessor(image_aspect_ratio=mode)
    outputs = processor(str(tmp_path / "deep.png"))["pixel_values"]
    rounded = PIL.Image.fromarray(np.rint(values.astype(np.float64) * 255 / 65535).astype(np.uint8), "L")
    assert torch.equal(outputs, processor(rounded)["pixel_values"])
    truncated = PIL.Image.fromarray((values >> 8).astype(np.uint8), "L")  # at most one level darker per pixel
    assert levels_apart(outputs, processor(truncated)["pixel_values"]) <= 2.0001  # bicubic can add one level


def test_a_16_bit_image_is_no_longer_white():
    values = gradient_16_bit(336, 336)
    outputs = TokenPackerImageProcessor()(PIL.Image.fromarray(values))["pixel_values"]
    white = reference_pad(PIL.Image.new("RGB", (336, 336), "white"))
    assert (outputs == white).float().mean().item() < 0.01  # it was 99.6 % white


def test_16_bit_samples_scale_by_255_over_65535():
    levels = np.arange(256, dtype=np.uint16).reshape(16, 16)
    eight_bit = TokenPackerImageProcessor()(PIL.Image.fromarray(levels.astype(np.uint8), "L"))["pixel_values"]
    sixteen = levels.astype(np.int64) * 257
    for values in (sixteen, np.minimum(sixteen + 128, 65535), np.maximum(sixteen - 128, 0)):  # rounded to the level
        image = PIL.Image.fromarray(values.astype(np.uint16))
        assert image.mode == "I;16"
        assert torch.equal(TokenPackerImageProcessor()(image)["pixel_values"], eight_bit)


def test_a_dark_16_bit_file_opened_as_mode_i_is_read_by_its_bit_depth(tmp_path):
    """Pillow opens 16-bit PGM files (and 16-bit PNGs on some versions) as 32-bit mode I: the file says 16 bits."""
    values = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 256) * 8  # dark: every value below 2048
    (tmp_path / "dark.pgm").write_bytes(b"P5\n64 64\n65535\n" + values.astype(">u2").tobytes())
    assert PIL.Image.open(tmp_path / "dark.pgm").mode == "I"
    expected = PIL.Image.fromarray(np.rint(values / 257).astype(np.uint8), "L")
    processor = TokenPackerImageProcessor()
    assert torch.equal(processor(str(tmp_path / "dark.pgm"))["pixel_values"], processor(expected)["pixel_values"])


@pytest.mark.parametrize(
    "values, expected",
    [
        pytest.param(np.linspace(0, 1, 64 * 64), lambda v: v * 255, id="F-within-0-1"),
        pytest.param(np.linspace(0, 60000, 64 * 64), lambda v: v / 257, id="F-16-bit-range"),
        pytest.param(np.linspace(-3.0, 5.0, 64 * 64), lambda v: (v + 3) / 8 * 255, id="F-any-range"),
        pytest.param(np.arange(64 * 64) * 15, lambda v: v / 257, id="I-16-bit-range"),
        pytest.param(np.arange(64 * 64) * 1000 - 5, lambda v: (v + 5) / 4095000 * 255, id="I-beyond-16-bit"),
    ],
)
def test_32_bit_images_are_read_by_their_range(tmp_path, values, expected):
    mode = "F" if values.dtype.kind == "f" else "I"
    array = values.reshape(64, 64).astype(np.float32 if mode == "F" else np.int32)
    image = PIL.Image.fromarray(array, mode)
    image.save(tmp_path / "deep.tiff")
    processor = TokenPackerImageProcessor()
    reference = processor(PIL.Image.fromarray(np.rint(expected(array.astype(np.float64))).astype(np.uint8), "L"))
    assert torch.equal(processor(image)["pixel_values"], reference["pixel_values"])
    assert torch.equal(processor(str(tmp_path / "deep.tiff"))["pixel_values"], reference["pixel_values"])


def test_uint16_arrays_and_tensors_scale_by_65535():
    image = photo(60, 80, seed=2)
    deep = np.asarray(image).astype(np.uint16) * 257
    processor = TokenPackerImageProcessor()
    expected = processor(image)["pixel_values"]
    assert torch.equal(processor(deep)["pixel_values"], expected)
    assert torch.equal(processor(deep[..., 0])["pixel_values"], processor(image.getchannel(0))["pixel_values"])
    assert torch.equal(processor(torch.from_numpy(deep.transpose(2, 0, 1).copy()))["pixel_values"], expected)


def test_float_images_must_be_finite():
    image = PIL.Image.fromarray(np.array([[0.5, np.nan], [2.0, 3.0]], dtype=np.float32), "F")
    with pytest.raises(ValueError, match="float images must hold finite values"):
        TokenPackerImageProcessor()(image)


# --- URLs ------------------------------------------------------------------------------------------------------------

HUGE_BODY = 300 * 1024 * 1024


class ImageServer(http.server.BaseHTTPRequestHandler):
    """Serves /photo.png, /notes.txt, /huge (300 MB streamed lazily), /huge-declared (Content-Length 300 MB), /slow."""

    png = b""

    def do_GET(self):
        if self.path == "/photo.png":
            self.reply(200, self.png, "image/png")
        elif self.path == "/notes.txt":
            self.reply(200, b"not an image at all", "text/plain")
        elif self.path in ("/huge", "/huge-declared"):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            if self.path == "/huge-declared":
                self.send_header("Content-Length", str(HUGE_BODY))
            self.end_headers()
            self.stream(bytes(1024 * 1024) for _ in range(HUGE_BODY // (1024 * 1024)))
        elif self.path == "/slow":
            self.send_response(200)
            self.end_headers()
            self.stream(time.sleep(0.2) or b"\x89" for _ in range(100))  # one byte every 0.2 s, for 20 s
        else:
            self.reply(404, b"nothing here", "text/plain")

    def reply(self, status, body, content_type):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def stream(self, chunks):
        try:
            for chunk in chunks:
                self.wfile.write(chunk)
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    buffer = io.BytesIO()
    photo(64, 48, seed=11).save(buffer, "PNG")
    ImageServer.png = buffer.getvalue()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ImageServer)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def silent_port():
    """A port that accepts connections (the kernel completes them) and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    yield listener.getsockname()[1]
    listener.close()


@contextlib.contextmanager
def finishes_within(seconds):
    start = time.monotonic()
    yield
    assert time.monotonic() - start < seconds


def test_a_png_url_gives_the_local_files_crops(server, tmp_path):
    (tmp_path / "photo.png").write_bytes(ImageServer.png)
    processor = TokenPackerImageProcessor()
    outputs = processor(f"{server}/photo.png")["pixel_values"]
    assert torch.equal(outputs, processor(str(tmp_path / "photo.png"))["pixel_values"])
    assert torch.equal(outputs, reference_pad(photo(64, 48, seed=11)))


def test_a_server_that_never_answers_times_out_naming_the_url(silent_port):
    url = f"http://127.0.0.1:{silent_port}/photo.png"
    with finishes_within(3), pytest.raises(ValueError, match=f"{url} did not answer within url_timeout = 0.5 s"):
        TokenPackerImageProcessor(url_timeout=0.5)(url)


def test_the_timeout_is_a_per_call_setting_and_passes_through_the_processor(silent_port, tmp_path):
    url = f"http://127.0.0.1:{silent_port}/photo.png"
    with finishes_within(3), pytest.raises(ValueError, match="did not answer within url_timeout = 0.3 s"):
        TokenPackerImageProcessor()(url, url_timeout=0.3)
    processor = tiny_processor(tmp_path)
    with finishes_within(3), pytest.raises(ValueError, match="did not answer within url_timeout = 0.4 s"):
        processor(images=url, text="<image>\nWhat is it?", url_timeout=0.4)


def test_a_slow_body_is_stopped_at_the_timeout(server):
    message = f"image URL {server}/slow took longer than url_timeout = 1 s"
    with finishes_within(3), pytest.raises(ValueError, match=message):
        TokenPackerImageProcessor(url_timeout=1)(f"{server}/slow")


def test_a_huge_body_is_stopped_at_the_size_cap(server):
    message = f"image URL {server}/huge is too large: more than max_url_bytes = 67108864"
    with finishes_within(10), pytest.raises(ValueError, match=message):
        TokenPackerImageProcessor(url_timeout=5)(f"{server}/huge")  # the default cap, 64 MiB
    with finishes_within(2), pytest.raises(ValueError, match="too large: more than max_url_bytes = 1000000 bytes"):
        TokenPackerImageProcessor()(f"{server}/huge", max_url_bytes=1_000_000)


def test_a_declared_huge_body_is_refused_before_reading(server):
    message = f"too large: {HUGE_BODY} bytes, more than max_url_bytes = 67108864"
    with finishes_within(2), pytest.raises(ValueError, match=message):
        TokenPackerImageProcessor(url_timeout=5)(f"{server}/huge-declared")


def test_http_errors_name_the_status_and_the_url(server):
    with pytest.raises(ValueError, match=f"HTTP 404 Not Found for image URL {server}/missing.png"):
        TokenPackerImageProcessor(url_timeout=1)(f"{server}/missing.png")


def test_content_that_is_not_an_image_is_named(server):
    with pytest.raises(ValueError, match=rf"the content at {server}/notes.txt is not an image \(content type text/"):
        TokenPackerImageProcessor(url_timeout=1)(f"{server}/notes.txt")


def test_a_refused_connection_names_the_url():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    url = f"http://127.0.0.1:{port}/photo.png"
    with pytest.raises(ValueError, match=f"could not connect to image URL {url}"):
        TokenPackerImageProcessor(url_timeout=1)(url)


@pytest.mark.parametrize("source", ["ftp://127.0.0.1/photo.png", "file:///etc/hostname"])
def test_only_http_and_https_urls_are_read(source):
    with pytest.raises(ValueError, match="image URLs must be http or https"):
        TokenPackerImageProcessor()(source)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"url_timeout": 0}, "url_timeout must be a positive number of seconds, got 0"),
        ({"url_timeout": float("inf")}, "url_timeout must be a positive number of seconds, got inf"),
        ({"url_timeout": "10"}, "url_timeout must be a positive number of seconds, got '10'"),
        ({"max_url_bytes": 0}, "max_url_bytes must be a positive integer, got 0"),
        ({"max_url_bytes": 1.5}, "max_url_bytes must be a positive integer, got 1.5"),
    ],
)
def test_bad_url_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        TokenPackerImageProcessor(**settings)
    (name,) = settings
    with pytest.raises(ValueError, match=name):
        TokenPackerImageProcessor()(photo(10, 10), **settings)


def test_url_settings_are_saved_and_loaded(tmp_path):
    processor = TokenPackerImageProcessor(url_timeout=2.5, max_url_bytes=1000)
    processor.save_pretrained(tmp_path)
    loaded = TokenPackerImageProcessor.from_pretrained(tmp_path)
    assert (loaded.url_timeout, loaded.max_url_bytes) == (2.5, 1000)
    assert (TokenPackerImageProcessor().url_timeout, TokenPackerImageProcessor().max_url_bytes) == (10.0, 64 * 2**20)


# --- other sources ---------------------------------------------------------------------------------------------------


def test_a_missing_file_does_not_exist(tmp_path):
    with pytest.raises(ValueError, match=f"image file '{tmp_path / 'absent.png'}' does not exist"):
        TokenPackerImageProcessor()(str(tmp_path / "absent.png"))
    with pytest.raises(ValueError, match="image file 'aGVsbG8=' does not exist"):  # base64 text is not guessed at
        TokenPackerImageProcessor()("aGVsbG8=")


def test_a_directory_is_not_an_image_file(tmp_path):
    with pytest.raises(ValueError, match=f"'{tmp_path}' is a directory, not an image file"):
        TokenPackerImageProcessor()(tmp_path)


def test_a_dict_of_images_is_refused_by_type():
    with pytest.raises(TypeError, match="images must be PIL images, .* got dict"):
        TokenPackerImageProcessor()({"a": photo(10, 10)})


def test_data_uris_are_decoded():
    buffer = io.BytesIO()
    photo(30, 40, seed=6).save(buffer, "PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    assert torch.equal(TokenPackerImageProcessor()(uri)["pixel_values"], reference_pad(photo(30, 40, seed=6)))


@pytest.mark.parametrize(
    "uri, message",
    [
        ("data:image/png;base64,!!!!", "holds invalid base64"),
        ("data:text/plain;base64,aGVsbG8=", r"data URIs must start with 'data:image/<format>;base64,'"),
        ("data:image/png,rawtext", r"data URIs must start with 'data:image/<format>;base64,'"),
        ("data:image/png;base64,aGVsbG8=", r"could not read an image from the data URI 'data:image/png;base64,aGVs"),
    ],
)
def test_bad_data_uris_are_refused(uri, message):
    with pytest.raises(ValueError, match=message):
        TokenPackerImageProcessor()(uri)


MALFORMED_FILES = {
    "random.png": np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
    "header-only.gif": b"GIF89a\x10\x00\x10\x00\x80\x00\x00",
    "bad-tiff.tif": b"II*\x00\x08\x00\x00\x00\xff\xff" + bytes(64),
    "bad-jpeg.jpg": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(100),
    "pgm-too-short.pgm": b"P5\n64 64\n65535\n" + bytes(10),
    "bmp-header.bmp": b"BM" + bytes(60),
}


@pytest.mark.parametrize("name", MALFORMED_FILES)
def test_malformed_files_are_value_errors_naming_the_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(MALFORMED_FILES[name])
    with pytest.raises(ValueError, match=f"could not read an image from '{path}'"):
        TokenPackerImageProcessor()(str(path))


def test_truncated_deep_and_plain_pngs_are_value_errors(tmp_path):
    for name, image in (("deep.png", PIL.Image.fromarray(gradient_16_bit())), ("plain.png", photo(200, 300))):
        image.save(tmp_path / name)
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError, match=f"could not read an image from '{tmp_path / name}'"):
            TokenPackerImageProcessor()(str(tmp_path / name))



def test_a_lazily_opened_truncated_pil_image_is_a_value_error(tmp_path):
    photo(200, 300).save(tmp_path / "plain.png")
    data = (tmp_path / "plain.png").read_bytes()
    image = PIL.Image.open(io.BytesIO(data[: len(data) // 2]))  # PIL reads the header now, the pixels later
    with pytest.raises(ValueError, match="could not read the given PIL image: OSError: image file is truncated"):
        TokenPackerImageProcessor()(image)
