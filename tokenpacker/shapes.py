"""Tiny shapes: a synthetic visual question-answering task that needs fine detail, for the demo's small model.

Each 336x336 scene holds one small shape (a circle, square or triangle 20 to 36 pixels across: about one 28-pixel
patch of the tiny model's tower, under 1% of the image) on a light grey background. Two questions ask for its colour
(one of 6) and where it is in a 3x3 grid (one of 9): the answer lies in a few patches that the projector packs, with
the 15 or so around them, into one of 9 tokens. Every scene comes from its own seed ("train-17", "test-3"), so the
data are the same on every machine and the held-out scenes never appear in training.

    python -m tokenpacker.shapes data --output-dir runs/shapes --num-train 16000 --num-test 600

`base` writes the random tower and language model that training starts from, `evaluate` scores a trained model on
the held-out scenes and `ship` copies a trained model into the package (`tokenpacker/pretrained/tiny-shapes`), where
the demo loads it. The README's Training section has the commands that make the shipped model.
"""

import argparse
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .processing import fast_tokenizer_from_sentencepiece, train_llama_sentencepiece
from .processing.processing_tokenpacker import VICUNA_V1_SYSTEM_PROMPT
from .staging import OutputFolder, check_output_is_safe

PRETRAINED = Path(__file__).parent / "pretrained" / "tiny-shapes"
# What a shipped model keeps of a trained folder: the package's own classes load it, so the exported remote code (and
# the auto_map entries naming it) is left out, and so are the Trainer's pickled arguments.
SHIPPED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)
IMAGE_SIZE = 336
GRID = 3
BACKGROUND = (224, 224, 224)
SHAPE_SIZES = (20, 36)  # pixels across
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
QUESTIONS = {"colour": "What colour is the shape?", "position": "Where is the shape?"}
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Scene:
    image: Image.Image
    colour: str
    position: str
    kind: str

    def questions(self) -> list[tuple[str, str]]:
        """The questions, with this scene's answers."""
        return [(question, getattr(self, attribute)) for attribute, question in QUESTIONS.items()]


def render_scene(split: str, index: int) -> Scene:
    """The scene `index` of `split` ("train" or "test"): always the same image and answers."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"index must be a non-negative integer, got {index!r}")
    rng = random.Random(f"{split}-{index}")
    kind, colour = rng.choice(KINDS), rng.choice(sorted(COLOURS))
    row, column = rng.randrange(GRID), rng.randrange(GRID)
    size = rng.randint(*SHAPE_SIZES)
    cell = IMAGE_SIZE // GRID
    left = column * cell + rng.randint(8, cell - size - 8)
    top = row * cell + rng.randint(8, cell - size - 8)
    right, bottom = left + size - 1, top + size - 1

    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    if kind == "circle":
        draw.ellipse((left, top, right, bottom), fill=COLOURS[colour])
    elif kind == "square":
        draw.rectangle((left, top, right, bottom), fill=COLOURS[colour])
    else:
        draw.polygon([((left + right) / 2, top), (left, bottom), (right, bottom)], fill=COLOURS[colour])
    return Scene(image, colour, POSITIONS[row][column], kind)


def conversation(question_answers: list[tuple[str, str]]) -> list[dict]:
    """LLaVA-style turns: the image comes with the first question."""
    turns = []
    for number, (question, answer) in enumerate(question_answers):
        turns.append({"from": "human", "value": f"<image>\n{question}" if number == 0 else question})
        turns.append({"from": "gpt", "value": answer})
    return turns


def write_dataset(output_dir: str | Path, num_train: int, num_test: int) -> Path:
    """Writes `images/`, `train.json` (the questions of each scene, in a random order) and `test.json` (one question
    per scene, colour and position in turn)."""
    output_dir = Path(output_dir)
    (output_dir / "images").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", num_train), ("test", num_test)):
        records = []
        for index in range(count):
            scene = render_scene(split, index)
            image_file = f"images/{split}-{index:06d}.png"
            scene.image.save(output_dir / image_file)
            pairs = scene.questions()
            if split == "train":
                random.Random(f"{split}-{index}-questions").shuffle(pairs)
            else:
                pairs = [pairs[index % len(pairs)]]
            records.append({"id": f"{split}-{index}", "image": image_file, "conversations": conversation(pairs)})
        (output_dir / f"{split}.json").write_text(json.dumps(records, indent=1))
    return output_dir


def train_tokenizer(output_dir: str | Path, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A LLaMA-style tokenizer (sentencepiece BPE with byte fallback; unk 0, bos 1, eos 2) for this task's chats."""
    rng = random.Random("tokenizer")
    sentences = []
    for index in range(2000):
        pairs = render_scene("train", index).questions()
        rng.shuffle(pairs)
        turns = " ".join(f"USER: {q} ASSISTANT: {a}" for q, a in pairs)
        sentences.append(f"{VICUNA_V1_SYSTEM_PROMPT} {turns}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model_file = train_llama_sentencepiece(output_dir / "tokenizer.model", sentences, vocab_size)
    return fast_tokenizer_from_sentencepiece(model_file, model_max_length=512)


def write_base_models(output_dir: str | Path) -> Path:
    """The from-scratch starting point of the demo's model, in `vision/` and `text/`: a random CLIP-like tower (336
    pixels, 28-pixel patches: a 12x12 grid, 3 layers of width 64) and a random Llama (3 layers of width 128) with the
    task's tokenizer."""
    output_dir = Path(output_dir)
    torch.manual_seed(0)
    tokenizer = train_tokenizer(output_dir / "text")
    tokenizer.save_pretrained(output_dir / "text")
    text_config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        initializer_range=0.08,  # Llama's 0.02 is for wide models: at width 128 the image is put to use much later
    )
    LlamaForCausalLM(text_config).save_pretrained(output_dir / "text")
    vision_config = CLIPVisionConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=28
    )
    CLIPVisionModel(vision_config).save_pretrained(output_dir / "vision")
    return output_dir


@torch.no_grad()
def evaluate(model, processor, data_path: str | Path, batch_size: int = 32) -> dict[str, float]:
    """Greedy answers to the single-question conversations of `data_path`: accuracy per question and overall."""
    data_path = Path(data_path)
    records = json.loads(data_path.read_text())
    model.eval()
    results: dict[str, list[bool]] = {question: [] for question in QUESTIONS.values()}
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        questions = [record["conversations"][0]["value"].replace("<image>", "").strip() for record in batch]
        prompts = [
            processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                add_generation_prompt=True,
                tokenize=False,
            )
            for question in questions
        ]
        images = [Image.open(data_path.parent / record["image"]).convert("RGB") for record in batch]
        inputs = processor(images=images, text=prompts)
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        answers = processor.post_process_image_text_to_text(generated[:, inputs["input_ids"].shape[1] :])
        for record, question, answer in zip(batch, questions, answers):
            results[question].append(answer == record["conversations"][1]["value"])
    accuracy = {question: sum(hits) / len(hits) for question, hits in results.items() if hits}
    accuracy["all"] = sum(sum(hits) for hits in results.values()) / len(records)
    return accuracy


def without_auto_map(settings: dict) -> dict:
    """`settings` without its `auto_map` entries, at the top level and in nested sections."""
    return {
        key: without_auto_map(value) if isinstance(value, dict) else value
        for key, value in settings.items()
        if key != "auto_map"
    }


def ship(model_dir: str | Path, output_dir: str | Path = PRETRAINED, force: bool = False) -> Path:
    """Copies the files of a trained model that the package ships (`SHIPPED_FILES`, JSON without `auto_map`) into
    `output_dir`, replacing an existing folder only with `force` and never the trained folder itself. The copy is
    written beside the target and moved into place once complete (`tokenpacker.staging`)."""
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    missing = [name for name in SHIPPED_FILES if not (model_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{model_dir} is not a trained TokenPacker folder: it lacks {', '.join(missing)}")
    check_output_is_safe(output_dir, {"the trained model folder": model_dir}, written="the shipped model")
    if output_dir.exists() and any(output_dir.iterdir()) and not force:
        raise FileExistsError(f"{output_dir} exists and is not empty: pass force=True (--force) to replace it")
    with OutputFolder(output_dir, activity="shipping") as staging:
        for name in SHIPPED_FILES:
            if name.endswith(".json"):
                settings = without_auto_map(json.loads((model_dir / name).read_text()))
                (staging.path / name).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
            else:
                shutil.copyfile(model_dir / name, staging.path / name)
        staging.commit()
    return output_dir


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="write the train and test sets")
    data.add_argument("--output-dir", "--output_dir", dest="output_dir", required=True)
    data.add_argument("--num-train", "--num_train", dest="num_train", type=int, default=16000)
    data.add_argument("--num-test", "--num_test", dest="num_test", type=int, default=600)
    base = commands.add_parser("base", help="write the random tower and language model that training starts from")
    base.add_argument("--output-dir", "--output_dir", dest="output_dir", required=True)
    scores = commands.add_parser("evaluate", help="accuracy of a trained model on held-out scenes")
    scores.add_argument("--model", required=True, help="a TokenPacker folder")
    scores.add_argument("--data-path", "--data_path", dest="data_path", required=True, help="test.json of `data`")
    shipped = commands.add_parser("ship", help="copy a trained model into the package, where the demo loads it")
    shipped.add_argument("--model", required=True, help="the trained TokenPacker folder")
    shipped.add_argument(
        "--output-dir", "--output_dir", dest="output_dir", default=str(PRETRAINED),
        help="default: the package's tiny-shapes folder",
    )
    shipped.add_argument("--force", action="store_true", help="replace an existing folder")
    args = parser.parse_args(argv)
    if args.command == "ship":
        try:
            folder = ship(args.model, args.output_dir, args.force)
        except (OSError, ValueError) as error:
            parser.error(str(error))
        print(f"Copied {len(SHIPPED_FILES)} files of {args.model} to {folder}: {', '.join(SHIPPED_FILES)}")
    elif args.command == "data":
        folder = write_dataset(args.output_dir, args.num_train, args.num_test)
        print(
            f"Wrote {args.num_train} training and {args.num_test} test scenes to {folder}: "
            f"{args.num_train + args.num_test} images in {folder / 'images'}, {folder / 'train.json'} "
            f"({args.num_train} conversations), {folder / 'test.json'} ({args.num_test} questions)"
        )
    elif args.command == "base":
        folder = write_base_models(args.output_dir)
        print(f"Wrote the vision tower to {folder / 'vision'} and the language model and tokenizer to {folder / 'text'}")
    else:
        from .modeling import TokenPackerForConditionalGeneration
        from .processing import TokenPackerProcessor

        model = TokenPackerForConditionalGeneration.from_pretrained(args.model)
        processor = TokenPackerProcessor.from_pretrained(args.model)
        print(json.dumps(evaluate(model, processor, args.data_path), indent=1))


if __name__ == "__main__":
    main()
