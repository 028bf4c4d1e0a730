"""`vllm serve` with the TokenPacker plugin answers OpenAI chat-completions requests on 127.0.0.1."""

import base64
import io
import json
import sys
import urllib.error
import urllib.request

import pytest

from tokenpacker.shapes import PRETRAINED, render_scene

from ..server_process import free_port, running_server
from .helpers import REPO_ROOT, vllm_environment

SERVED_NAME = "tokenpacker/pretrained/tiny-shapes"  # what the docs' command serves, from the repository root
DOCS = REPO_ROOT / "docs" / "serving.md"
STARTUP_TIMEOUT = 420  # seconds until the server answers /health
REQUEST_TIMEOUT = 120


def request(url: str, payload: dict | None = None, timeout: float = REQUEST_TIMEOUT) -> tuple[int, dict | str]:
    """(status, JSON body or text) of a GET, or of a POST of `payload` as JSON."""
    data = None if payload is None else json.dumps(payload).encode()
    message = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(message, timeout=timeout) as response:
            status, body = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, body = error.code, error.read().decode()
    try:
        return status, json.loads(body)
    except json.JSONDecodeError:
        return status, body


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The base URL of `vllm serve` on the shipped tiny model, one image per prompt at most."""
    tmp_path = tmp_path_factory.mktemp("vllm-serve")
    port = free_port()
    command = [
        sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(PRETRAINED),
        "--host", "127.0.0.1", "--port", str(port), "--served-model-name", SERVED_NAME,
        "--dtype", "float32", "--max-model-len", "512", "--enforce-eager", "--limit-mm-per-prompt", '{"image": 1}',
    ]  # fmt: skip
    base_url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    env = vllm_environment(tmp_path)
    with running_server(command, f"{base_url}/health", log_path, STARTUP_TIMEOUT, cwd=REPO_ROOT, env=env):
        yield base_url


def image_part(image) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return {"type": "image_url", "image_url": {"url": url}}


def chat(question: str, images: list) -> dict:
    content = [*map(image_part, images), {"type": "text", "text": question}]
    return {
        "model": SERVED_NAME,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": 8,
    }


def test_chat_completion_with_an_image_data_url_is_answered_right(server):
    scene = render_scene("test", 1)
    for question, answer in ((q, a) for q, a in scene.questions()):
        status, body = request(f"{server}/v1/chat/completions", chat(question, [scene.image]))
        assert status == 200, body
        assert body["choices"][0]["message"]["content"].strip() == answer
        assert body["choices"][0]["finish_reason"] == "stop"


def test_two_images_over_the_limit_of_one_get_vllms_error(server):
    scene = render_scene("test", 1)
    status, body = request(f"{server}/v1/chat/completions", chat("What colour is the shape?", [scene.image] * 2))
    assert status == 400, body
    assert "At most 1 image(s) may be provided in one prompt" in body["error"]["message"]


def documented_client_example() -> str:
    """The OpenAI client block of docs/serving.md."""
    section = DOCS.read_text().split("## Serve with the OpenAI API", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_documented_openai_client_example_answers(server, tmp_path, capsys):
    scene = render_scene("test", 2)
    scene.image.save(tmp_path / "photo.jpg", quality=95)
    source = documented_client_example()
    assert "http://127.0.0.1:8000/v1" in source and "photo.jpg" in source
    source = source.replace("http://127.0.0.1:8000/v1", f"{server}/v1").replace("photo.jpg", str(tmp_path / "photo.jpg"))
    exec(compile(source, str(DOCS), "exec"), {"__name__": "__docs__"})
    assert capsys.readouterr().out.strip() == scene.colour
