"""Chat about an image in the terminal with a TokenPacker model: `tokenpacker-chat [--model PATH] [--image FILE]`.

Answers are streamed as they are generated and the conversation is kept across questions (the original's Vicuna v1
history, as its `llava/serve/cli.py`). Without `--model` it loads the tiny-shapes model shipped in the package and,
without `--image`, a held-out tiny-shapes scene, so it runs offline. Commands: /image, /reset, /help, /quit.

From a terminal it prompts "USER:" and writes "ASSISTANT: <answer>"; errors are reported and the chat goes on. From a
pipe it writes one answer line per question line on stdout and nothing else (information goes to stderr; line breaks
in an answer become spaces); the first error ends it with exit status 1.
"""

import argparse
import math
import os
import signal
import sys
import threading
from contextlib import closing, contextmanager

from transformers.utils import logging as transformers_logging

from .chat_session import DTYPES, ChatSession, ImageInfo
from .shapes import PRETRAINED, render_scene

COMMANDS = (
    ("/image FILE_OR_URL", "chat about another image (a new conversation)"),
    ("/reset", "forget the questions and answers, keep the image"),
    ("/help", "show the commands"),
    ("/quit", "leave (also /exit, Ctrl-D, or Ctrl-C at the prompt; Ctrl-C during an answer stops the answer)"),
)
BOLD, GREEN, RED, PLAIN = "\033[1m", "\033[32m", "\033[31m", "\033[0m"


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


class TerminalChat:
    """Reads questions and commands, one a line, and writes the streamed answers of a `ChatSession`.

    Interactive (a terminal on stdin): prompts, colours when stdout is a terminal too, errors reported and skipped.
    Otherwise: answers only on stdout, one line each; information on stderr; the first error ends the chat.
    """

    def __init__(self, session: ChatSession, interactive: bool, colour: bool):
        self.session = session
        self.interactive = interactive
        self.colour = colour
        self.info_stream = sys.stdout if interactive else sys.stderr

    def styled(self, text: str, style: str, in_prompt: bool = False) -> str:
        if not self.colour:
            return text
        if in_prompt:  # readline measures the prompt's width without what lies between \001 and \002
            return f"\001{style}\002{text}\001{PLAIN}\002"
        return f"{style}{text}{PLAIN}"

    def info(self, text: str):
        print(text, file=self.info_stream, flush=True)

    def error(self, text: str):
        print(self.styled(f"error: {text}", RED), file=sys.stderr, flush=True)

    def show_visual_tokens(self, info: ImageInfo):
        self.info(f"Visual tokens: {info.summary()}")

    def load_image(self, source: str):
        source = source.strip()
        if len(source) >= 2 and source[0] == source[-1] and source[0] in "'\"":
            source = source[1:-1]
        if not source:
            raise ValueError("/image needs a file path or an http(s) URL")
        if "://" not in source:
            source = os.path.expanduser(source)
        info = self.session.set_image(source)
        self.info(f"Image: {source}, {info.size[0]}x{info.size[1]}")
        self.show_visual_tokens(info)

    def answer(self, question: str):
        if self.session.image_info is None:
            raise ValueError("load an image first: /image FILE_OR_URL")
        label = self.styled("ASSISTANT:", BOLD + GREEN) + " " if self.interactive else ""
        with self.ctrl_c_stops() as stopped, closing(self.session.ask(question)) as pieces:
            sys.stdout.write(label)
            sys.stdout.flush()
            for piece in pieces:
                if stopped.is_set():
                    break
                sys.stdout.write(piece if self.interactive else piece.replace("\n", " "))
                sys.stdout.flush()
        sys.stdout.write(" [stopped]\n" if stopped.is_set() else "\n")
        sys.stdout.flush()

    @contextmanager
    def ctrl_c_stops(self):
        """In a terminal, Ctrl-C while an answer streams stops its generation and sets the event that this yields.
        A handler, not KeyboardInterrupt: Python drops that exception when it lands in a callback run by
        the garbage collector, and the answer would go on."""
        stopped = threading.Event()
        if not self.interactive:
            yield stopped
            return

        def on_ctrl_c(signum, frame):
            stopped.set()
            self.session.stop()

        previous = signal.signal(signal.SIGINT, on_ctrl_c)
        try:
            yield stopped
        finally:
            signal.signal(signal.SIGINT, previous)

    def handle(self, line: str) -> bool:
        """Runs one line; False when the chat should end."""
        text = line.strip()
        if not text:
            return True
        if not text.startswith("/"):
            self.answer(text)
            return True
        command, _, argument = text.partition(" ")
        if command in ("/quit", "/exit"):
            return False
        if command == "/image":
            self.load_image(argument)
        elif command == "/reset":
            self.session.reset()
            self.info("Conversation reset; the image stays.")
        elif command == "/help":
            width = max(len(usage) for usage, _ in COMMANDS)
            for usage, meaning in COMMANDS:
                self.info(f"  {usage.ljust(width)}  {meaning}")
            self.info("  anything else is a question about the image")
        else:
            raise ValueError(f"unknown command {command}; /help lists the commands")
        return True

    def lines(self):
        """The lines typed at the prompt or read from the pipe, until EOF, /quit or Ctrl-C at the prompt."""
        if not self.interactive:
            yield from sys.stdin
            return
        import readline  # input() then edits the line and keeps a history of them

        prompt = self.styled("USER:", BOLD, in_prompt=True) + " "
        while True:
            try:
                yield input(prompt)
            except (EOFError, KeyboardInterrupt):
                print()
                return

    def run(self) -> int:
        for line in self.lines():
            try:
                if not self.handle(line):
                    break
            except (ValueError, TypeError, OSError, RuntimeError) as error:
                self.error(one_line(error))
                if not self.interactive:
                    return 1
        return 0


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tokenpacker-chat",
        description=__doc__.splitlines()[0],
        epilog="Commands in the chat: " + "; ".join(f"{usage}: {meaning}" for usage, meaning in COMMANDS),
    )
    parser.add_argument(
        "--model", default=str(PRETRAINED), help="a TokenPacker folder or Hub id (default: the shipped tiny model)"
    )
    parser.add_argument("--image", help="an image file or http(s) URL (default: a held-out tiny-shapes scene)")
    parser.add_argument("--scene", type=int, default=0, help="without --image: which held-out tiny-shapes scene")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="the longest answer, in tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) answers greedily, above 0 samples")
    parser.add_argument("--dtype", choices=DTYPES, help="the model's dtype (default: transformers' default)")
    parser.add_argument("--device", help="where the model runs, e.g. cpu, cuda:0 (default: cuda when available)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}")
    if not 0 <= args.temperature < math.inf:
        parser.error(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.scene < 0:
        parser.error(f"--scene must be a non-negative integer, got {args.scene}")
    if args.image is not None and args.scene != 0:
        parser.error("--scene picks the image when there is no --image: give one of them")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    verbosity, progress_bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()  # the chat's output only: no loading bars or generation notes
    transformers_logging.disable_progress_bar()
    try:
        return chat(args)
    except KeyboardInterrupt:  # while the model loads, or anywhere from a pipe
        print(file=sys.stderr)
        return 130
    finally:
        transformers_logging.set_verbosity(verbosity)
        if progress_bars:
            transformers_logging.enable_progress_bar()


def chat(args: argparse.Namespace) -> int:
    """Loads the model and the image, then chats; the exit status."""
    interactive = sys.stdin.isatty()
    colour = interactive and sys.stdout.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"
    first_line = args.image or f"held-out tiny-shapes scene {args.scene} (--image FILE_OR_URL for another)"
    print(f"Image: {first_line}", file=sys.stdout if interactive else sys.stderr, flush=True)
    try:
        session = ChatSession.from_pretrained(
            args.model,
            dtype=args.dtype,
            device=args.device,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
        )
    except (OSError, ValueError, TypeError) as error:
        print(f"error: could not load the model {args.model}: {one_line(error)}", file=sys.stderr)
        return 1
    terminal = TerminalChat(session, interactive, colour)
    mode = session.processor.image_processor.image_aspect_ratio
    dtype = str(session.model.dtype).removeprefix("torch.")
    name = f"{PRETRAINED.name} (shipped)" if args.model == str(PRETRAINED) else args.model
    terminal.info(f"Model: {name} ('{mode}', {dtype} on {session.model.device})")
    image = render_scene("test", args.scene).image if args.image is None else os.path.expanduser(args.image)
    try:
        terminal.show_visual_tokens(session.set_image(image))
    except (ValueError, TypeError) as error:
        terminal.error(one_line(error))
        if not interactive:
            return 1
    if interactive:
        terminal.info("Ask about the image; /help shows the commands.")
    return terminal.run()


if __name__ == "__main__":
    sys.exit(main())
