"""`tokenpacker-web`: chat with a TokenPacker model about an image in the browser, on Gradio.

One model is loaded at start-up and shared; every browser tab has its own conversation (a `ChatSession` in Gradio's
per-session state). Answers stream in through Gradio's queue, one generation at a time for the whole server. The
examples are held-out tiny-shapes scenes, drawn at start-up. Besides the page's own events, `/answer` answers one
question about one image over HTTP (for `gradio_client`). Gradio comes with the `web` extra; nothing else in the
package imports this module.
"""

import argparse
import sys
import time
from collections.abc import Iterator

from PIL import Image

try:
    import gradio as gr
except ImportError as error:
    raise ImportError(
        "tokenpacker-web needs Gradio, which the `web` extra installs: pip install 'tokenpacker[web]'"
    ) from error

from .chat_session import DTYPES, ChatSession, ImageInfo
from .shapes import COLOURS, QUESTIONS, render_scene

GENERATION = "generation"  # the queue's concurrency group of every event that runs the model
MAX_QUESTION_CHARS = 1200  # the original demo's cut-off for a question that comes with an image
NO_IMAGE = "Upload an image or pick an example first."


def example_scenes() -> list[Image.Image]:
    """The first held-out tiny-shapes scene of each colour: images the shipped model has never seen."""
    scenes, index = {}, 0
    while len(scenes) < len(COLOURS):
        scene = render_scene("test", index)
        scenes.setdefault(scene.colour, scene.image)
        index += 1
    return list(scenes.values())


def image_summary(info: ImageInfo) -> str:
    """The image's size and what it costs the language model: its visual tokens and, in HD mode, its crop grid."""
    width, height = info.size
    return f"**Image:** {width}x{height}  \n**Visual tokens:** {info.summary()}"


def chat_history(messages: list[dict]) -> list[dict]:
    """A conversation in transformers' chat format as the chatbot's messages: the text of each turn."""
    return [
        {"role": message["role"], "content": "".join(part["text"] for part in message["content"] if "text" in part)}
        for message in messages
    ]


def checked_question(text: str) -> str:
    question = text.strip()
    if not question:
        raise gr.Error("Type a question first.")
    if len(question) > MAX_QUESTION_CHARS:
        raise gr.Error(f"Questions are limited to {MAX_QUESTION_CHARS} characters; this one has {len(question)}.")
    return question


class WebDemo:
    """The shared model and the page around it: one `ChatSession` per browser session, all on the same model."""

    def __init__(self, chat: ChatSession, model_name: str):
        self.chat = chat
        self.model_name = model_name

    def new_session(self) -> ChatSession:
        return ChatSession(
            self.chat.model,
            self.chat.processor,
            max_new_tokens=self.chat.max_new_tokens,
            temperature=self.chat.temperature,
        )

    def show_image(self, image: Image.Image | None, session: ChatSession | None):
        """A new image starts a new conversation (in a new session the first time)."""
        if image is None:
            return None, [], "", ""
        session = session or self.new_session()
        try:
            info = session.set_image(image)
        except ValueError as error:
            raise gr.Error(str(error)) from error
        return session, [], image_summary(info), ""

    def answer(self, text: str, session: ChatSession | None) -> Iterator[tuple[str, list[dict], str]]:
        """Streams the answer into the chat: yields (question box, chat messages, answer time)."""
        if session is None:
            raise gr.Error(NO_IMAGE)
        question = checked_question(text)
        history = [*chat_history(session.messages), {"role": "user", "content": question}]
        yield "", history, ""
        start, answer = time.perf_counter(), ""
        try:
            for piece in session.ask(question):
                answer += piece
                yield "", [*history, {"role": "assistant", "content": answer}], ""
        except ValueError as error:
            raise gr.Error(str(error)) from error
        seconds = time.perf_counter() - start
        yield "", chat_history(session.messages), f"**Time to answer:** {seconds:.2f} s"

    def answer_once(self, image: Image.Image | None, text: str) -> Iterator[str]:
        """The HTTP API: one question about one image in a conversation of its own; streams the answer so far."""
        if image is None:
            raise gr.Error(NO_IMAGE)
        question = checked_question(text)
        session = self.new_session()
        answer = ""
        try:
            session.set_image(image)
            for piece in session.ask(question):
                answer += piece
                yield answer.strip()
        except ValueError as error:
            raise gr.Error(str(error)) from error

    @staticmethod
    def clear(session: ChatSession | None):
        """Forgets the turns and keeps the image."""
        if session is not None:
            session.reset()
        return [], ""

    def build(self) -> gr.Blocks:
        with gr.Blocks(title="TokenPacker", analytics_enabled=False) as page:
            session = gr.State(None)
            gr.Markdown(
                f"# TokenPacker\nModel: {self.model_name}. Upload an image or pick an example, then ask about it: "
                "TokenPacker packs the image into a few visual tokens for the language model."
            )
            with gr.Row():
                with gr.Column(scale=2):
                    image = gr.Image(type="pil", label="Image", sources=["upload", "clipboard"], elem_id="image")
                    image_info = gr.Markdown(elem_id="image-info")
                    gr.Examples(
                        [[scene] for scene in example_scenes()], inputs=[image], label="Held-out tiny-shapes scenes"
                    )
                with gr.Column(scale=3):
                    chatbot = gr.Chatbot(label="Conversation", buttons=["copy", "copy_all"], elem_id="chatbot")
                    question = gr.Textbox(
                        show_label=False, placeholder=QUESTIONS["colour"], submit_btn="Send", elem_id="question"
                    )
                    with gr.Row():
                        answer_time = gr.Markdown(elem_id="answer-time")
                        clear = gr.Button("Clear conversation", elem_id="clear")
            with gr.Row(visible=False):
                api_image = gr.Image(type="pil", label="image")
                api_question = gr.Textbox(label="question")
                api_answer = gr.Textbox(label="answer")
                api_trigger = gr.Button()

            answering = question.submit(
                self.answer,
                [question, session],
                [question, chatbot, answer_time],
                api_name="ask",
                concurrency_id=GENERATION,
                concurrency_limit=1,
                show_progress="minimal",
            )
            image.change(
                self.show_image,
                [image, session],
                [session, chatbot, image_info, answer_time],
                api_name="set_image",
                cancels=[answering],
                concurrency_limit=None,
            )
            for clearing in (clear.click, chatbot.clear):
                clearing(self.clear, [session], [chatbot, answer_time], cancels=[answering], concurrency_limit=None)
            api_trigger.click(
                self.answer_once,
                [api_image, api_question],
                [api_answer],
                api_name="answer",
                concurrency_id=GENERATION,
                concurrency_limit=1,
            )
        return page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenpacker-web", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder or Hub id (default: the shipped tiny-shapes model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="longest answer, in tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 answers greedily")
    parser.add_argument("--dtype", choices=DTYPES, help="the model's dtype (default: transformers' default)")
    parser.add_argument("--device", help="where the model runs, e.g. cpu, cuda:0 (default: cuda if available)")
    args = parser.parse_args(argv)
    if not 0 <= args.port < 65536:
        parser.error(f"--port must be between 0 and 65535, got {args.port}")
    try:
        chat = ChatSession.from_pretrained(
            args.model,
            dtype=args.dtype,
            device=args.device,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
        )
    except (OSError, ValueError) as error:
        parser.error(str(error))
    page = WebDemo(chat, args.model or "the shipped tiny-shapes model").build()
    page.queue(default_concurrency_limit=None).launch(server_name=args.host, server_port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
