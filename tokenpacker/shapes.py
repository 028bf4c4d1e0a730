"""Tiny shapes: a synthetic visual question-answering task that needs fine detail, for the demo's small model.

Each 336x336 scene holds one to three small shapes (about 20 to 36 pixels: less than a 28-pixel patch to 1.3 of
one) of different kinds and colours, each in its own cell of a 3x3 grid. The questions ask for the colour of a
shape, where it is, which shape has a colour, and how many shapes there are. Every scene comes from its own
seed (`"train-17"`, `"test-3"`), so the data are the same on every machine and the held-out scenes never appear in
training.

    python -m tokenpacker.shapes data --output_dir runs/shapes --num_train 12000 --num_test 500
"""

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from transformers import PreTrainedTokenizerFast

from .conversion import fast_tokenizer_from_sentencepiece, train_llama_sentencepiece
from .processing.processing_tokenpacker import VICUNA_V1_SYSTEM_PROMPT

IMAGE_SIZE = 336
GRID = 3
COLOURS = {
    "red": (220, 50, 47),
    "green": (50, 160, 60),
    "blue": (40, 90, 220),
    "yellow": (230, 195, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 20),
}
KINDS = ("circle", "square", "triangle")
POSITIONS = (("top left", "top", "top right"), ("left", "centre", "right"), ("bottom left", "bottom", "bottom right"))
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    row: int
    column: int

    @property
    def position(self) -> str:
        return POSITIONS[self.row][self.column]


@dataclass(frozen=True)
class Scene:
    image: Image.Image
    shapes: tuple[Shape, ...]

    def questions(self) -> list[tuple[str, str]]:
        """Every question this scene answers, with its answer."""
        pairs = [("How many shapes are there?", str(len(self.shapes)))]
        for shape in self.shapes:
            pairs += [
                (f"What colour is the {shape.kind}?", shape.colour),
                (f"Where is the {shape.kind}?", shape.position),
                (f"Which shape is {shape.colour}?", shape.kind),
            ]
        return pairs


def render_scene(split: str, index: int) -> Scene:
    """The scene `index` of `split` ("train" or "test"): always the same image and shapes."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"index must be a non-negative integer, got {index!r}")
    rng = random.Random(f"{split}-{index}")
    background = tuple(rng.randint(180, 235) for _ in range(3))
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    draw = ImageDraw.Draw(image)
    count = rng.randint(1, 3)
    cells = rng.sample(range(GRID * GRID), count)
    kinds = rng.sample(KINDS, count)
    colours = rng.sample(sorted(COLOURS), count)
    cell_size = IMAGE_SIZE // GRID
    shapes = []
    for cell, kind, colour in zip(cells, kinds, colours):
        row, column = divmod(cell, GRID)
        size = rng.randint(20, 36)
        left = column * cell_size + rng.randint(8, cell_size - size - 8)
        top = row * cell_size + rng.randint(8, cell_size - size - 8)
        box = (left, top, left + size - 1, top + size - 1)
        if kind == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif kind == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(left + size / 2, top), (left, top + size - 1), (left + size - 1, top + size - 1)], fill=COLOURS[colour])
        shapes.append(Shape(kind, colour, row, column))
    return Scene(image, tuple(shapes))


def conversation(question_answers: list[tuple[str, str]]) -> list[dict]:
    """LLaVA-style turns: the image comes with the first question."""
    turns = []
    for number, (question, answer) in enumerate(question_answers):
        turns.append({"from": "human", "value": f"<image>\n{question}" if number == 0 else question})
        turns.append({"from": "gpt", "value": answer})
    return turns


def write_dataset(output_dir: str | Path, num_train: int, num_test: int, questions_per_scene: int = 3) -> Path:
    """Writes `images/`, `train.json` (several questions per scene) and `test.json` (one question per scene)."""
    output_dir = Path(output_dir)
    (output_dir / "images").mkdir(parents=True, exist_ok=True)
    for split, count, per_scene in (("train", num_train, questions_per_scene), ("test", num_test, 1)):
        records = []
        for index in range(count):
            scene = render_scene(split, index)
            image_file = f"images/{split}-{index:06d}.png"
            scene.image.save(output_dir / image_file)
            pairs = scene.questions()
            chosen = random.Random(f"{split}-{index}-questions").sample(pairs, min(per_scene, len(pairs)))
            records.append({"id": f"{split}-{index}", "image": image_file, "conversations": conversation(chosen)})
        (output_dir / f"{split}.json").write_text(json.dumps(records, indent=1))
    return output_dir


def train_tokenizer(output_dir: str | Path, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A LLaMA-style tokenizer (sentencepiece BPE with byte fallback; unk 0, bos 1, eos 2) for this task's chats."""
    rng = random.Random("tokenizer")
    sentences = []
    for index in range(2000):
        pairs = render_scene("train", index).questions()
        turns = " ".join(f"USER: {q} ASSISTANT: {a}" for q, a in rng.sample(pairs, min(3, len(pairs))))
        sentences.append(f"{VICUNA_V1_SYSTEM_PROMPT} {turns}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model_file = train_llama_sentencepiece(output_dir / "tokenizer.model", sentences, vocab_size)
    return fast_tokenizer_from_sentencepiece(model_file, model_max_length=512)


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="write the train and test sets")
    data.add_argument("--output_dir", required=True)
    data.add_argument("--num_train", type=int, default=12000)
    data.add_argument("--num_test", type=int, default=500)
    data.add_argument("--questions_per_scene", type=int, default=3)
    args = parser.parse_args(argv)
    if args.command == "data":
        folder = write_dataset(args.output_dir, args.num_train, args.num_test, args.questions_per_scene)
        print(f"Wrote {args.num_train} training and {args.num_test} test scenes to {folder}")


if __name__ == "__main__":
    main()
