"""`tokenpacker-chat`: through a pipe and through a pseudo-terminal, multi-turn, /image, /reset, quitting, errors.

The shipped tiny-shapes model is checked on colour questions about held-out scenes (the true colour from
`render_scene`), other answers against the non-streamed greedy answer of `generate` on the original's prompt.
"""

import io
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.utils import logging as transformers_logging

from tokenpacker.chat import TerminalChat, main
from tokenpacker.demo import DEMO_IMAGE, build_demo_checkpoint
from tokenpacker.shapes import PRETRAINED, QUESTIONS, render_scene

from .test_chat_session import greedy_answer, vicuna_v1_prompt

COLOUR, POSITION = QUESTIONS["colour"], QUESTIONS["position"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x01\x02\r]")
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Held-out scenes 0 (the chat's default image) and 2 (saved as a file), of different colours."""
    first, second = render_scene("test", 0), render_scene("test", 2)
    assert first.colour != second.colour
    path = tmp_path_factory.mktemp("scenes") / "scene 2.png"
    second.image.save(path)
    return first, second, path


@pytest.fixture(scope="module")
def position_answer(scenes):
    """What the shipped model answers greedily to the position question about scene 0 after the (true) colour
    answer, not streamed."""
    model = AutoModelForImageTextToText.from_pretrained(PRETRAINED)
    processor = AutoProcessor.from_pretrained(PRETRAINED)
    scene = scenes[0]
    return greedy_answer(model, processor, scene.image, vicuna_v1_prompt([(COLOUR, scene.colour)], POSITION), 8)


def test_from_a_pipe_one_answer_line_per_question(scenes, position_answer):
    first, second, path = scenes
    lines = f"{COLOUR}\n{POSITION}\n\n/image {path}\n{COLOUR}\n/reset\n{COLOUR}\n/quit\n{COLOUR}\n"
    done = subprocess.run(
        [sys.executable, "-m", "tokenpacker.chat", "--max-new-tokens", "8"],
        input=lines,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr
    answers = [first.colour, position_answer, second.colour, second.colour]  # nothing after /quit
    assert done.stdout == "".join(answer + "\n" for answer in answers)
    assert done.stderr.splitlines() == [
        "Image: held-out tiny-shapes scene 0 (--image FILE_OR_URL for another)",
        f"Model: tiny-shapes (shipped) ('pad', float32 on {'cuda:0' if torch.cuda.is_available() else 'cpu'})",
        "Visual tokens: 36 for the image; LLaVA-1.5 uses 576 for one 336x336 crop",
        f"Image: {path}, {second.image.width}x{second.image.height}",
        "Visual tokens: 36 for the image; LLaVA-1.5 uses 576 for one 336x336 crop",
        "Conversation reset; the image stays.",
    ]


class TerminalSession:
    """`python -m tokenpacker.chat ...` on a pseudo-terminal: what it writes, read as it comes, and keys typed."""

    def __init__(self, *args: str):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the chat, with the terminal as stdin, stdout and stderr
            command = [sys.executable, "-m", "tokenpacker.chat", *args]
            # as a shell starts a program in a terminal: Ctrl-C interrupts it, even where this run ignores SIGINT
            # (a background job of a script does), which Python would keep
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execve(sys.executable, command, {**os.environ, "TERM": "xterm"})
        self.raw = ""  # read and not yet consumed
        self.transcript = ""  # all that was read, as written
        self.ended = False

    def read_until(self, pattern: str) -> str:
        """The plain text (colours and readline's control sequences removed) up to the first match of `pattern`,
        which is consumed; fails after TIMEOUT_S seconds."""
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            text = ANSI.sub("", self.raw)
            found = re.search(pattern, text)
            if found:
                self.raw = text[found.end() :]
                return text[: found.end()]
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"no {pattern!r} within {TIMEOUT_S} s; got {text!r}")
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:  # the chat ended
                chunk = b""
            if not chunk:
                raise AssertionError(f"the chat ended before {pattern!r}; got {text!r}")
            self.raw += chunk.decode(errors="replace")
            self.transcript += chunk.decode(errors="replace")

    def type(self, keys: str):
        os.write(self.fd, keys.encode())

    def close(self):
        """Ends the chat if it still runs (a failed test) and closes the terminal."""
        if self.ended:
            return
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        os.close(self.fd)
        self.ended = True

    def exit_status(self) -> int:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            try:  # drain the terminal so that the chat never blocks writing to it
                while select.select([self.fd], [], [], 0.1)[0] and os.read(self.fd, 4096):
                    pass
            except OSError:
                pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                self.ended = True
                return os.waitstatus_to_exitcode(status)
        raise AssertionError(f"the chat did not end within {TIMEOUT_S} s")


@pytest.fixture
def terminal():
    """Starts chats on pseudo-terminals; any still running at the end of the test is ended."""
    sessions = []

    def start(*args: str) -> TerminalSession:
        sessions.append(TerminalSession(*args))
        return sessions[-1]

    yield start
    for session in sessions:
        session.close()


def test_in_a_terminal_prompts_streams_switches_images_resets_and_quits_on_ctrl_d(terminal, scenes, position_answer):
    first, second, path = scenes
    chat = terminal("--max-new-tokens", "8")
    opening = chat.read_until(r"USER: ")
    assert opening.startswith("Image: held-out tiny-shapes scene 0 (--image FILE_OR_URL for another)\n")
    assert "Visual tokens: 36 for the image" in opening and "/help shows the commands" in opening

    chat.type(COLOUR + "\n")
    assert chat.read_until(r"USER: ") == f"{COLOUR}\nASSISTANT: {first.colour}\nUSER: "
    chat.type(POSITION + "\n")
    assert chat.read_until(r"USER: ") == f"{POSITION}\nASSISTANT: {position_answer}\nUSER: "
    chat.type("/help\n")
    assert "/image FILE_OR_URL" in chat.read_until(r"USER: ")
    chat.type("/image no-such-file.png\n")
    assert "error: image file 'no-such-file.png' does not exist" in chat.read_until(r"USER: ")  # and it goes on
    chat.type(f"/image '{path}'\n")
    size = f"{second.image.width}x{second.image.height}"
    assert f"Image: {path}, {size}\nVisual tokens: 36 for the image" in chat.read_until(r"USER: ")
    chat.type(COLOUR + "\n")
    assert f"ASSISTANT: {second.colour}\n" in chat.read_until(r"USER: ")
    chat.type("/reset\n")
    assert "Conversation reset; the image stays." in chat.read_until(r"USER: ")
    chat.type(COLOUR + "\n")
    assert f"ASSISTANT: {second.colour}\n" in chat.read_until(r"USER: ")
    chat.type("\x04")
    assert chat.exit_status() == 0
    assert "\x1b[1m" in chat.transcript and "\x1b[32m" in chat.transcript  # a bold prompt, a green ASSISTANT:


def test_in_a_terminal_ctrl_c_stops_an_answer_and_the_chat_goes_on(terminal, tmp_path):
    folder = build_demo_checkpoint(tmp_path / "hd", hd=True)
    chat = terminal("--model", str(folder), "--image", str(DEMO_IMAGE), "--max-new-tokens", "3000")
    assert "grid of crops + 1 thumbnail, 144 tokens per crop" in chat.read_until(r"USER: ")
    chat.type("What is in the image?\n")
    chat.read_until(r"ASSISTANT: ")  # a random model would go on for its 3000 tokens
    chat.type("\x03")
    # the random model's text may itself hold "USER: ": the prompt that counts is the one after " [stopped]"
    chat.read_until(r" \[stopped\]\nUSER: ")
    chat.type("\x04")
    assert chat.exit_status() == 0


def test_ctrl_c_at_the_prompt_ends_the_chat(monkeypatch, capsys):
    typed = iter(["What colour is the shape?", KeyboardInterrupt, "never read"])

    def keyboard(prompt):
        key = next(typed)
        if key is KeyboardInterrupt:
            raise KeyboardInterrupt
        return key

    monkeypatch.setattr("builtins.input", keyboard)
    terminal = TerminalChat(session=None, interactive=True, colour=False)
    assert list(terminal.lines()) == ["What colour is the shape?"]
    assert next(typed) == "never read"


def test_errors_in_the_arguments_and_from_a_pipe(tmp_path, monkeypatch, capsys):
    verbosity = transformers_logging.get_verbosity()
    with pytest.raises(SystemExit):
        main(["--max-new-tokens", "0"])
    assert "--max-new-tokens must be a positive integer, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--image", "photo.png", "--scene", "3"])
    assert "--scene picks the image when there is no --image" in capsys.readouterr().err

    monkeypatch.setattr(sys, "stdin", open(os.devnull))
    assert main(["--model", str(tmp_path / "missing")]) == 1
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith(f"error: could not load the model {tmp_path / 'missing'}: ")
    assert main(["--image", str(tmp_path / "missing.png")]) == 1
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith(f"error: image file '{tmp_path / 'missing.png'}' does not exist (images given as strings")

    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/colour\n{COLOUR}\n"))
    assert main([]) == 1  # from a pipe, the first error ends the chat
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines()[-1] == "error: unknown command /colour; /help lists the commands"
    assert transformers_logging.get_verbosity() == verbosity  # the chat quiets transformers only while it runs
