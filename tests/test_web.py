"""`tokenpacker-web`: the page in a real headless browser (Debian's Chromium driven by Selenium), its HTTP API through
`gradio_client`, and the module's boundaries. The server is the installed console script on a 127.0.0.1 port."""

import os
import re
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
from transformers import AutoProcessor

from tokenpacker.shapes import PRETRAINED, QUESTIONS, render_scene
from tokenpacker.testing import reference_grids

from .serving.helpers import slice_model
from .web_server import missing, require_gradio

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# Without the background-networking flags Chromium tries to reach its own services and stalls on a closed network.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1280,960",
)  # fmt: skip
WAIT_S = 30  # for any one thing to show on the page
SCREENSHOT = os.environ.get("TOKENPACKER_WEB_SCREENSHOT")  # where to keep the page's screenshot (docs/images/web.png)
COLOUR, POSITION = QUESTIONS["colour"], QUESTIONS["position"]
NO_IMAGE = "Upload an image or pick an example first."


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Two held-out scenes of different colours as PNG files, with their answers. Both positions have two words, so
    that the answer streams in more than one piece."""
    folder = tmp_path_factory.mktemp("scenes")
    chosen = {}
    for index in range(5, 40):
        scene = render_scene("test", index)
        if scene.colour not in {other.colour for other, _ in chosen.values()} and " " in scene.position:
            scene.image.save(folder / f"{index}.png")
            chosen[index] = (scene, folder / f"{index}.png")
        if len(chosen) == 2:
            return list(chosen.values())
    raise AssertionError("no two held-out scenes of different colours with two-word positions")


def visual_tokens_of(image) -> int:
    """The image-token ids that the shipped model's processor writes into the prompt for `image`."""
    processor = AutoProcessor.from_pretrained(PRETRAINED)
    input_ids = processor(images=[image], text="<image>")["input_ids"][0]
    return int((input_ids == processor.image_token_id).sum())


@pytest.fixture
def open_browser(tmp_path, monkeypatch):
    """Opens a new headless Chromium (its own empty profile) on a URL; all are closed after the test."""
    if find_spec("selenium") is None:
        missing("Selenium is not installed (pip install -e '.[test]')")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.exists():
            missing(f"{path} is missing (apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium never looks for a driver of its own
    drivers = []

    def open_browser(url: str):
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / f'profile-{len(drivers)}'}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
        drivers.append(driver)
        driver.set_page_load_timeout(WAIT_S)
        driver.get(url)
        return Page(driver)

    yield open_browser
    for driver in drivers:
        driver.quit()


class Page:
    """The demo's page in one browser: what a user does and sees."""

    def __init__(self, driver):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.by = driver, By
        self.wait = WebDriverWait(driver, WAIT_S)
        self.element("#question textarea")

    def element(self, css: str):
        return self.wait.until(lambda driver: driver.find_element(self.by.CSS_SELECTOR, css), f"no {css} on the page")

    def text(self, css: str) -> str:
        self.element(css)
        return self.driver.execute_script("return document.querySelector(arguments[0]).innerText.trim()", css)

    def messages(self) -> list[tuple[str, str]]:
        """(user or bot, text) of each message in the chat, read in one step while the page may be re-rendering."""
        found = self.driver.execute_script(
            "return [...document.querySelectorAll('#chatbot [data-testid=user], #chatbot [data-testid=bot]')]"
            ".map(message => [message.dataset.testid, message.innerText.trim()])"
        )
        return [tuple(message) for message in found]

    def upload(self, path: Path) -> str:
        """Uploads an image; returns the image panel's text once it shows."""
        self.element("#image input[type=file]").send_keys(str(path))
        self.wait.until(lambda _: "Visual tokens" in self.text("#image-info"), "the image's visual tokens never showed")
        return self.text("#image-info")

    def ask(self, question: str) -> str:
        """Asks; returns the answer once complete (the time to answer shows when the stream has ended)."""
        turns = len(self.messages()) // 2 + 1
        self.element("#question textarea").clear()
        self.element("#question textarea").send_keys(question)
        self.element("#question [data-testid=submit-button]").click()
        self.wait.until(
            lambda _: len(self.messages()) == 2 * turns and self.text("#answer-time"), f"no answer to {question!r}"
        )
        assert re.fullmatch(r"Time to answer: \d+\.\d\d s", self.text("#answer-time"))
        assert self.messages()[-2] == ("user", question)
        return self.messages()[-1][1]

    def clear(self):
        self.element("#clear").click()
        self.wait.until(lambda _: not self.messages(), "the conversation was not cleared")

    def error(self) -> str:
        return self.wait.until(lambda driver: driver.find_element(self.by.CSS_SELECTOR, ".toast-body").text, "no error")


def test_the_page_answers_about_an_uploaded_scene_and_every_browser_has_its_own_conversation(
    web_demo, scenes, open_browser, tmp_path
):
    (scene, png), (other_scene, other_png) = scenes
    first = open_browser(web_demo)
    info = first.upload(png)
    assert re.search(r"Visual tokens: (\d+) for the image", info).group(1) == str(visual_tokens_of(scene.image))
    assert f"Image: {scene.image.width}x{scene.image.height}" in info
    assert first.ask(COLOUR) == scene.colour
    assert first.ask(POSITION) == scene.position  # the second turn, on the same image
    assert first.driver.save_screenshot(SCREENSHOT or str(tmp_path / "web.png"))

    second = open_browser(web_demo)
    assert second.messages() == [] and second.text("#image-info") == ""
    second.element("#question textarea").send_keys(COLOUR)
    second.element("#question [data-testid=submit-button]").click()
    assert NO_IMAGE in second.error()  # the first browser's image is not this one's
    second.upload(other_png)
    assert second.ask(COLOUR) == other_scene.colour
    assert second.messages() == [("user", COLOUR), ("bot", other_scene.colour)]

    assert first.ask(COLOUR) == scene.colour  # still the first browser's own image, after the second's upload
    assert len(first.messages()) == 6
    first.clear()
    assert "Visual tokens" in first.text("#image-info")  # clearing keeps the image
    assert first.ask(POSITION) == scene.position
    assert first.messages() == [("user", POSITION), ("bot", scene.position)]


def test_the_http_api_streams_the_same_answers(web_demo, scenes):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    (scene, png), _ = scenes
    client = Client(web_demo, verbose=False)
    job = client.submit(handle_file(png), POSITION, api_name="/answer")
    assert job.result(timeout=WAIT_S) == scene.position
    streamed = job.outputs()
    assert len(streamed) >= 2 and streamed[-1] == scene.position  # two words: more than one piece
    assert all(scene.position.startswith(partial) for partial in streamed)

    colour = client.predict(handle_file(png), COLOUR, api_name="/answer")
    client.predict(handle_file(png), api_name="/set_image")  # the page's own events, in this client's session
    _, conversation, _ = client.predict(COLOUR, api_name="/ask")
    answers = ["".join(part["text"] for part in message["content"]) for message in conversation]
    assert answers == [COLOUR, colour] and colour == scene.colour

    with pytest.raises(AppError, match="Type a question first"):
        client.predict(handle_file(png), "  ", api_name="/answer")
    with pytest.raises(AppError, match="Questions are limited to 1200 characters; this one has 1201"):
        client.predict(handle_file(png), "?" * 1201, api_name="/answer")


def test_an_hd_image_shows_its_grid_of_crops(tmp_path):
    require_gradio()
    from tokenpacker.chat_session import ChatSession
    from tokenpacker.web import WebDemo

    demo = WebDemo(ChatSession.from_pretrained(slice_model(tmp_path), max_new_tokens=4), "slice")
    image = render_scene("test", 5).image.resize((900, 400))
    session, conversation, info, answer_time = demo.show_image(image, None)
    (h_block, w_block), = reference_grids([400], [900], max_slices=session.processor.image_processor.max_slices)
    crops = h_block * w_block + 1
    assert "**Image:** 900x400" in info and f"{h_block}x{w_block} grid of crops + 1 thumbnail" in info
    assert f"**Visual tokens:** {crops * 36} for the image" in info  # 36 tokens a crop, like the 'pad' image
    assert conversation == [] and answer_time == ""


def test_bad_arguments_are_refused_by_name(capsys):
    require_gradio()
    from tokenpacker.web import main

    for arguments, message in (
        (["--max-new-tokens", "0"], "max_new_tokens must be a positive integer, got 0"),
        (["--temperature", "-1"], "temperature must be a finite number >= 0"),
        (["--port", "70000"], "--port must be between 0 and 65535, got 70000"),
    ):
        with pytest.raises(SystemExit):
            main(arguments)
        assert message in capsys.readouterr().err


def test_tokenpacker_imports_without_gradio_and_the_web_app_names_its_extra():
    code = (
        "import sys\n"
        "import tokenpacker, tokenpacker.chat_session, tokenpacker.demo\n"
        "assert 'gradio' not in sys.modules\n"
        "sys.modules['gradio'] = None\n"
        "try:\n    import tokenpacker.web\nexcept ImportError as error:\n    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    expected = "tokenpacker-web needs Gradio, which the `web` extra installs: pip install 'tokenpacker[web]'"
    assert expected in result.stdout
