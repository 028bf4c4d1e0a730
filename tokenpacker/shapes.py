"""Tiny shapes: a synthetic visual question-answering task that needs fine detail, for the demo's small model.

Each scene, 200 to 1000 pixels a side and up to 3:1 either way, holds one small shape (a circle, square or triangle
1.5 to 1.9 of the tiny model's 28-pixel patches across once the processor has padded and resized the image to
336x336) with a dark outline on a mid-grey background. The questions ask for its colour (one of 6), where it is in a
3x3 grid over the image (one of 9) and its kind (one of 3), yes/no on its colour and kind (half "yes") and, for
any other question, a short description ("a red circle, top left"). Every scene comes from its own seed ("train-17",
"test-3"), so the data are the same on every machine and the held-out scenes never appear in training;
`render_scene(split, index).questions()` gives a scene's questions with their true answers.

    python -m tokenpacker.shapes data --output-dir runs/shapes
    python -m tokenpacker.shapes base --output-dir runs/base
    python -m tokenpacker.shapes train --data-dir runs/shapes --base-dir runs/base --output-dir runs/tiny-shapes
    python -m tokenpacker.shapes evaluate --model runs/tiny-shapes --data-path runs/shapes/test.json
    python -m tokenpacker.shapes ship --model runs/tiny-shapes --force
    python -m tokenpacker.shapes reproduce --output-dir runs/reproduce

`base` writes the tower (pretrained on the scenes' attributes) and the random language model that training starts
from, `train` runs `tokenpacker-train` with the shipped model's arguments on one thread, `evaluate` scores a trained
model on the held-out scenes per question kind and aspect ratio, and `ship` copies a trained model into the package
(`tokenpacker/pretrained/tiny-shapes`), where the demo loads it. `reproduce` runs data, base, train and evaluate in
one folder and checks that the weights equal the shipped ones byte for byte. docs/training.md has the study.
"""

import argparse
import json
import math
import random
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
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
IMAGE_SIZE = 336  # the side of the square the processor pads and resizes every image to
GRID = 3
SIDES = (200, 1000)  # pixels, each side of a scene
MAX_RATIO = 3.0  # the longer side over the shorter one
# Aspect-ratio groups by width / height: tall below 3:4, wide above 4:3, square-ish between.
RATIO_GROUPS = {"tall": (1 / MAX_RATIO, 3 / 4), "square-ish": (3 / 4, 4 / 3), "wide": (4 / 3, MAX_RATIO)}
# Mid grey, close to the colour that the processor pads images with (CLIP's mean, (122, 116, 104)): on a light
# background the padded band's edges varied far more from scene to scene than the shape did, and the model never
# learned to look at the image.
BACKGROUND = (128, 128, 128)
# Across, in pixels of the processor's 336-pixel square: 1.5 to 1.9 of the tiny tower's 28-pixel patches. At most 80%
# of a grid cell's shorter side, so that in a 3:1 scene (cells of 37 such pixels) the shape keeps clear of the cell's
# edges.
SHAPE_SIZES = (42, 52)
MAX_SHAPE_IN_CELL = 0.8
# Every shape has a dark outline, a tenth of its size wide: the outline's pixels do not depend on the fill colour, so
# the kind of shape shows in the features of the random tower, which are close to linear in the pixels. Without it the
# shape's pattern only showed multiplied by its colour, and the model never told the kinds apart.
OUTLINE = (24, 24, 24)
OUTLINE_WIDTH = 0.1
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
QUESTION_KINDS = ("colour", "position", "shape", "yes/no", "description")
# The open questions on a scene's attributes.
QUESTIONS = {"colour": "What colour is the shape?", "position": "Where is the shape?", "shape": "What shape is it?"}
# The yes/no questions on the colour and on the kind, "{}" the value asked about.
YES_NO_QUESTIONS = {"colour": "Is the shape {}?", "shape": "Is there a {}?"}
DESCRIBE_QUESTIONS = (
    "What is in this image?",
    "Describe the image.",
    "What do you see?",
    "What is this?",
    "What does the picture show?",
    "Tell me about this image.",
)
# Words of the other questions in training (answered with the description): a question out of the task still gets a
# short answer and an end.
OTHER_WORDS = (
    "a an the this that these it is are was be do does can could would will you me my your I we they there here what "
    "which who why how when where many much some any all more very not no yes and or but if of in on at to for with "
    "from about image picture photo scene colour color shape shapes object thing things red green blue black white big "
    "small large long good new old one two three first last time day people man woman dog cat car house tree sky water "
    "city food book word name story poem song question answer tell say write explain describe show give make find look "
    "see think know like want help please count number size light dark left right up down inside outside near far"
).split()
SPLITS = ("train", "test")
NUM_TRAIN, NUM_TEST = 16000, 1200
# How many yes/no questions in a row a training conversation asks on the colour and on the kind (at least, at most),
# when it asks yes/no on them (`training_questions`).
YES_NO_RUNS = {"colour": (3, 3), "shape": (2, 2)}
MAX_STEPS = 3000
TRAINING_THREADS = 1
# The projector of the shipped model (`TokenPackerConfig` settings, and `tokenpacker-train`'s flags in
# `training_arguments`): 12x12 patches pack 2x2 into 6x6 = 36 tokens, two a cell of the 3x3 grid across a square
# image, so that even a 3:1 image, a band of the padded square 4 patches wide, spans two tokens (docs/training.md).
PROJECTOR_SETTINGS = {
    "scale_factor": 2, "vision_feature_layer": -1, "multi_level_feature_layers": [1, 2, 3], "projector_num_heads": 4,
    "initializer_range": 0.2,
}  # fmt: skip
# Pretraining of the random tower in `base`: scenes, steps of `PRETRAINING_BATCH` scenes, learning rate (AdamW).
PRETRAINING_SCENES, PRETRAINING_STEPS, PRETRAINING_BATCH, PRETRAINING_LR = 4000, 2000, 16, 3e-4


@contextmanager
def training_threads():
    """Torch on `TRAINING_THREADS` threads inside the block, as many as before after it: the float sums, and so the
    weights, depend on the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(TRAINING_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def ratio_group(width: int, height: int) -> str:
    """The aspect-ratio group ("tall", "square-ish", "wide") of a width x height image."""
    ratio = width / height
    return "tall" if ratio < 3 / 4 else "wide" if ratio > 4 / 3 else "square-ish"


@dataclass(frozen=True)
class Scene:
    """One shape on a grey background; `absent_*` are a colour and a kind it does not have (the "no" answers of its
    yes/no questions)."""

    image: Image.Image
    colour: str
    position: str
    kind: str
    absent_colour: str
    absent_kind: str

    @property
    def description(self) -> str:
        """The answer to the description and out-of-task questions: "a red circle, top left"."""
        return f"{'an' if self.colour[0] in 'aeiou' else 'a'} {self.colour} {self.kind}, {self.position}"

    def questions(self, kind: str | None = None) -> list[tuple[str, str]]:
        """(question, true answer) pairs of one question kind of `QUESTION_KINDS`, or of all: "yes/no" holds one
        "yes" and one "no" question each on the colour and the kind (balanced, POPE-style)."""
        if kind is not None and kind not in QUESTION_KINDS:
            raise ValueError(f"kind must be one of {QUESTION_KINDS} or None, got {kind!r}")
        pairs = {
            "colour": [(QUESTIONS["colour"], self.colour)],
            "position": [(QUESTIONS["position"], self.position)],
            "shape": [(QUESTIONS["shape"], self.kind)],
            "yes/no": [
                (YES_NO_QUESTIONS["colour"].format(self.colour), "yes"),
                (YES_NO_QUESTIONS["colour"].format(self.absent_colour), "no"),
                (YES_NO_QUESTIONS["shape"].format(self.kind), "yes"),
                (YES_NO_QUESTIONS["shape"].format(self.absent_kind), "no"),
            ],
            "description": [(DESCRIBE_QUESTIONS[0], self.description)],
        }
        return pairs[kind] if kind is not None else [pair for kind_pairs in pairs.values() for pair in kind_pairs]


def scene_size(rng: random.Random) -> tuple[int, int]:
    """Width and height: an aspect-ratio group at random, a log-uniform ratio in it (a third of the square-ish scenes
    exactly square), then the longer side uniform over what keeps both sides in `SIDES`."""
    low, high = RATIO_GROUPS[rng.choice(sorted(RATIO_GROUPS))]
    ratio = 1.0 if low < 1 < high and rng.random() < 1 / 3 else math.exp(rng.uniform(math.log(low), math.log(high)))
    stretch = max(ratio, 1 / ratio)
    longer = rng.randint(math.ceil(SIDES[0] * stretch), SIDES[1])
    shorter = max(SIDES[0], round(longer / stretch))
    return (longer, shorter) if ratio >= 1 else (shorter, longer)


def render_scene(split: str, index: int) -> Scene:
    """The scene `index` of `split` ("train" or "test"): always the same image and answers.

    The image is 200 to 1000 pixels a side, up to 3:1 either way; its shape lies inside one cell of a 3x3 grid over
    the image, clear of the cell's edges, and is scaled with the image to 1.5 to 1.9 patches of the processed square.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"index must be a non-negative integer, got {index!r}")
    rng = random.Random(f"{split}-{index}")
    width, height = scene_size(rng)
    kind, colour = rng.choice(KINDS), rng.choice(sorted(COLOURS))
    row, column = rng.randrange(GRID), rng.randrange(GRID)
    cell_width, cell_height = width / GRID, height / GRID
    pixels_per_square_pixel = max(width, height) / IMAGE_SIZE
    size = round(rng.uniform(*SHAPE_SIZES) * pixels_per_square_pixel)
    size = min(size, math.floor(MAX_SHAPE_IN_CELL * min(cell_width, cell_height)))
    # the shape's offset in its cell: in the middle half of the room the cell leaves
    left = round(column * cell_width + rng.uniform(0.25, 0.75) * (cell_width - size))
    top = round(row * cell_height + rng.uniform(0.25, 0.75) * (cell_height - size))
    right, bottom = left + size - 1, top + size - 1

    outline = max(1, round(OUTLINE_WIDTH * size))
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    if kind == "circle":
        draw.ellipse((left, top, right, bottom), fill=COLOURS[colour], outline=OUTLINE, width=outline)
    elif kind == "square":
        draw.rectangle((left, top, right, bottom), fill=COLOURS[colour], outline=OUTLINE, width=outline)
    else:
        corners = [((left + right) / 2, top), (left, bottom), (right, bottom)]
        draw.polygon(corners, fill=COLOURS[colour], outline=OUTLINE, width=outline)
    return Scene(
        image,
        colour,
        POSITIONS[row][column],
        kind,
        absent_colour=rng.choice([name for name in sorted(COLOURS) if name != colour]),
        absent_kind=rng.choice([name for name in KINDS if name != kind]),
    )


def conversation(question_answers: list[tuple[str, str]]) -> list[dict]:
    """LLaVA-style turns: the image comes with the first question."""
    turns = []
    for number, (question, answer) in enumerate(question_answers):
        turns.append({"from": "human", "value": f"<image>\n{question}" if number == 0 else question})
        turns.append({"from": "gpt", "value": answer})
    return turns


def other_question(rng: random.Random) -> str:
    """A question out of the task: 2 to 9 words of `OTHER_WORDS`, capitalised, with "?" or "."."""
    words = rng.choices(OTHER_WORDS, k=rng.randint(2, 9))
    return " ".join(words).capitalize() + rng.choice("?.")


def yes_no_run(true: str, options: list[str] | tuple[str, ...], count: int, rng: random.Random) -> list[tuple]:
    """`count` yes/no questions in a row on one attribute: (value asked, true answer) on distinct values of
    `options`. Until `true` was asked, each asks about it at even odds, else about another value; after a "yes" the
    rest are "no", which the conversation's history tells as well as the image."""
    asked, run = set(), []
    for _ in range(count):
        if true not in asked and rng.random() < 0.5:
            value = true
        else:
            value = rng.choice([option for option in options if option != true and option not in asked])
        asked.add(value)
        run.append((value, "yes" if value == true else "no"))
    return run


def training_questions(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """One training conversation on `scene`.

    A fifth of the conversations ask one question only: a description question or another question (answered with
    the description). The others ask on each of the colour, kind and position in random order, then for the
    description or another question. On the colour and the kind, two times in three the questions are yes/no, a run
    of `YES_NO_RUNS` of them on distinct values (`yes_no_run`: the first "yes" at even odds), else the open question.
    No open answer can be read off an earlier one."""
    last = (rng.choice([rng.choice(DESCRIBE_QUESTIONS), other_question(rng)]), scene.description)
    if rng.random() < 1 / 5:
        return [last]
    yes_no = {"colour": (scene.colour, sorted(COLOURS)), "shape": (scene.kind, KINDS)}
    pairs = []
    for topic in rng.sample(["colour", "shape", "position"], 3):
        if topic in yes_no and rng.random() < 2 / 3:
            true, options = yes_no[topic]
            run = yes_no_run(true, options, rng.randint(*YES_NO_RUNS[topic]), rng)
            pairs += [(YES_NO_QUESTIONS[topic].format(value), answer) for value, answer in run]
        else:
            pairs.append(scene.questions(topic)[0])
    return [*pairs, last]


def test_question(scene: Scene, index: int) -> tuple[str, str, str]:
    """The held-out scene `index`'s one question: (kind, question, answer), the kinds of `QUESTION_KINDS` in turn and
    the four yes/no questions in turn among the yes/no scenes."""
    kind = QUESTION_KINDS[index % len(QUESTION_KINDS)]
    pairs = scene.questions(kind)
    return (kind, *pairs[(index // len(QUESTION_KINDS)) % len(pairs)])


def write_dataset(output_dir: str | Path, num_train: int, num_test: int) -> Path:
    """Writes `images/`, `train.json` (one, or four to seven questions per scene, `training_questions`) and
    `test.json` (one question per scene, `test_question`, with its kind in "question_kind")."""
    output_dir = Path(output_dir)
    (output_dir / "images").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", num_train), ("test", num_test)):
        records = []
        for index in range(count):
            scene = render_scene(split, index)
            image_file = f"images/{split}-{index:06d}.png"
            scene.image.save(output_dir / image_file)
            record = {"id": f"{split}-{index}", "image": image_file}
            if split == "train":
                pairs = training_questions(scene, random.Random(f"{split}-{index}-questions"))
            else:
                kind, question, answer = test_question(scene, index)
                pairs, record["question_kind"] = [(question, answer)], kind
            records.append({**record, "conversations": conversation(pairs)})
        (output_dir / f"{split}.json").write_text(json.dumps(records, indent=1))
    return output_dir


def train_tokenizer(output_dir: str | Path, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A LLaMA-style tokenizer (sentencepiece BPE with byte fallback; unk 0, bos 1, eos 2) for this task's chats,
    trained on chats of every question of 2,000 training scenes (`Scene.questions`, a description question and
    another question) in random order: its pieces do not depend on the mix of `training_questions`."""
    sentences = []
    for index in range(2000):
        scene, rng = render_scene("train", index), random.Random(f"tokenizer-{index}")
        described = [(rng.choice(DESCRIBE_QUESTIONS), scene.description), (other_question(rng), scene.description)]
        pairs = [*scene.questions(), *described]
        rng.shuffle(pairs)
        turns = " ".join(f"USER: {q} ASSISTANT: {a}" for q, a in pairs)
        sentences.append(f"{VICUNA_V1_SYSTEM_PROMPT} {turns}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model_file = train_llama_sentencepiece(output_dir / "tokenizer.model", sentences, vocab_size)
    return fast_tokenizer_from_sentencepiece(model_file, model_max_length=512)


def write_base_models(output_dir: str | Path, pretraining_steps: int = PRETRAINING_STEPS, log=print) -> Path:
    """The starting point of the demo's model, in `vision/` and `text/`: a CLIP-like tower (336 pixels, 28-pixel
    patches: a 12x12 grid, 3 layers of width 64) pretrained on the scenes (`pretrain_vision_tower`), and a random Llama
    (3 layers of width 128) with the task's tokenizer."""
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
    if pretraining_steps:
        tower = pretrain_vision_tower(output_dir / "vision", output_dir / "text", pretraining_steps, log=log)
        tower.save_pretrained(output_dir / "vision")
    return output_dir


def attribute_labels(scenes: list[Scene]) -> torch.Tensor:
    """(scenes, 3) class indices of each scene's colour (sorted names), kind and position (row by row)."""
    colours, positions = sorted(COLOURS), [name for names in POSITIONS for name in names]
    return torch.tensor(
        [(colours.index(scene.colour), KINDS.index(scene.kind), positions.index(scene.position)) for scene in scenes]
    )


def pretrain_vision_tower(
    vision_dir: str | Path, text_dir: str | Path, steps: int = PRETRAINING_STEPS, log=print
) -> CLIPVisionModel:
    """The tower of `vision_dir` trained to tell the scenes' colour, kind and position, as a TokenPacker model of the
    shipped model's settings with a fresh projector sees them: the 36 packed tokens of an image, flattened, go to one
    small MLP head per attribute, and tower, projector and heads train together (`PRETRAINING_STEPS` steps of
    `PRETRAINING_BATCH` of `PRETRAINING_SCENES` training scenes). Only the tower is kept.

    A random tower's features hold the kind of a shape so faintly that the language model, in the time the demo's
    training has, never learns to tell the kinds apart (see docs/training.md)."""
    from .building import build_model_and_processor

    torch.manual_seed(0)
    model, processor = build_model_and_processor(vision_dir, text_dir, **PROJECTOR_SETTINGS)
    inner = model.model

    def pixels(split: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        scenes = [render_scene(split, index) for index in range(count)]
        images = processor.image_processor(images=[scene.image for scene in scenes], return_tensors="pt")
        return images["pixel_values"], attribute_labels(scenes)

    def features(pixel_values: torch.Tensor) -> torch.Tensor:
        return inner.get_image_features(pixel_values=pixel_values).pooler_output.flatten(1)

    train_pixels, train_labels = pixels("train", PRETRAINING_SCENES)
    width = model.config.num_image_tokens * model.config.text_config.hidden_size  # 36 tokens per image
    heads = torch.nn.ModuleList(
        torch.nn.Sequential(torch.nn.Linear(width, 256), torch.nn.GELU(), torch.nn.Linear(256, classes))
        for classes in (len(COLOURS), len(KINDS), GRID * GRID)
    )
    parameters = [*heads.parameters(), *inner.multi_modal_projector.parameters(), *inner.vision_tower.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=PRETRAINING_LR, weight_decay=0)
    for step in range(steps):
        batch = torch.randint(0, len(train_pixels), (PRETRAINING_BATCH,))
        batch_features = features(train_pixels[batch])
        loss = sum(
            torch.nn.functional.cross_entropy(head(batch_features), train_labels[batch, attribute])
            for attribute, head in enumerate(heads)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % 250 == 0 or step + 1 == steps:
            log(f"tower pretraining: step {step + 1}/{steps}, loss {loss.item():.4f}")
    test_pixels, test_labels = pixels("test", 300)
    with torch.no_grad():
        test_features = torch.cat([features(test_pixels[start : start + 50]) for start in range(0, 300, 50)])
        scores = [
            (head(test_features).argmax(-1) == test_labels[:, attribute]).float().mean().item()
            for attribute, head in enumerate(heads)
        ]
    log("tower pretraining, held-out scenes 0-299: colour {:.3f}, kind {:.3f}, position {:.3f}".format(*scores))
    return inner.vision_tower


def training_arguments(data_dir: str | Path, base_dir: str | Path, output_dir: str | Path, max_steps: int) -> list[str]:
    """The `tokenpacker-train` arguments of the shipped model: stage 2 (projector and language model) with the tower
    trained too at a third of their learning rate, from the base models of `base`, on the train.json of `data`."""
    projector = []
    for name, value in PROJECTOR_SETTINGS.items():
        projector += [f"--{name.replace('_', '-')}", *map(str, value if isinstance(value, list) else [value])]
    return [
        "--vision-tower", f"{base_dir}/vision", "--language-model", f"{base_dir}/text", *projector,
        "--data-path", f"{data_dir}/train.json", "--per-device-train-batch-size", "16",
        "--max-steps", str(max_steps), "--learning-rate", "3e-4", "--lr-scheduler-type", "cosine",
        "--train-vision-tower", "--vision-tower-lr", "1e-4", "--warmup-steps", "100", "--weight-decay", "0",
        "--logging-steps", "100", "--save-strategy", "no", "--dataloader-num-workers", "1", "--use-cpu", "--seed", "0",
        "--report-to", "none",
        "--output-dir", str(output_dir),
    ]  # fmt: skip


def accuracy_table(results: list[tuple[str, str, bool]]) -> dict:
    """(question kind, aspect-ratio group, right) per answer -> accuracy per kind, per group and over all."""
    table = {"question kind": {}, "aspect ratio": {}}
    for column, names in (("question kind", QUESTION_KINDS), ("aspect ratio", RATIO_GROUPS)):
        position = 0 if column == "question kind" else 1
        for name in [*names, *sorted({result[position] for result in results} - set(names))]:
            hits = [result[2] for result in results if result[position] == name]
            if hits:
                table[column][name] = sum(hits) / len(hits)
    table["all"] = sum(result[2] for result in results) / len(results)
    return table


@torch.no_grad()
def evaluate(model, processor, data_path: str | Path, batch_size: int = 32, max_new_tokens: int = 8) -> dict:
    """Greedy answers to the single-question conversations of `data_path` (test.json of `data`), each right when it
    equals the true answer: accuracy per question kind, per aspect-ratio group of the image and over all."""
    data_path = Path(data_path)
    records = json.loads(data_path.read_text())
    model.eval()
    results = []
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
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers = processor.post_process_image_text_to_text(generated[:, inputs["input_ids"].shape[1] :])
        for record, question, image, answer in zip(batch, questions, images, answers):
            right = answer == record["conversations"][1]["value"]
            results.append((record.get("question_kind", question), ratio_group(*image.size), right))
    return accuracy_table(results)


def reproduce(
    output_dir: str | Path,
    num_train: int = NUM_TRAIN,
    num_test: int = NUM_TEST,
    pretraining_steps: int = PRETRAINING_STEPS,
    max_steps: int = MAX_STEPS,
    log=print,
) -> dict:
    """`data`, `base` and `train` into `output_dir`/shapes, /base and /tiny-shapes (a new or empty folder), then
    `evaluate` on the held-out scenes. Returns the accuracy table and, with the shipped model's settings (the
    defaults), whether the trained weights equal the shipped ones byte for byte under "identical to shipped"."""
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise FileExistsError(f"{output_dir} exists and is not an empty folder: reproduce writes a new one")
    from .modeling import TokenPackerForConditionalGeneration
    from .processing import TokenPackerProcessor
    from .training import main as train_main

    started = time.monotonic()
    data_dir, base_dir, model_dir = output_dir / "shapes", output_dir / "base", output_dir / "tiny-shapes"
    write_dataset(data_dir, num_train, num_test)
    log(f"data: {num_train} training and {num_test} test scenes in {data_dir}")
    arguments = training_arguments(data_dir, base_dir, model_dir, max_steps)
    with training_threads():
        write_base_models(base_dir, pretraining_steps, log=log)
        log(f"tokenpacker-train {' '.join(arguments)}  (on {TRAINING_THREADS} threads)")
        train_main(arguments)
    log(f"data, base and train took {time.monotonic() - started:.0f} s")
    model = TokenPackerForConditionalGeneration.from_pretrained(model_dir)
    results = evaluate(model, TokenPackerProcessor.from_pretrained(model_dir), data_dir / "test.json")
    shipped_settings = (num_train, pretraining_steps, max_steps) == (NUM_TRAIN, PRETRAINING_STEPS, MAX_STEPS)
    if shipped_settings:
        weights = [(folder / "model.safetensors").read_bytes() for folder in (model_dir, PRETRAINED)]
        results["identical to shipped"] = weights[0] == weights[1]
    return results


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
    data.add_argument("--num-train", "--num_train", dest="num_train", type=int, default=NUM_TRAIN)
    data.add_argument("--num-test", "--num_test", dest="num_test", type=int, default=NUM_TEST)
    base = commands.add_parser(
        "base", help="write the pretrained tower and the random language model that training starts from"
    )
    base.add_argument("--output-dir", "--output_dir", dest="output_dir", required=True)
    base.add_argument(
        "--pretraining-steps", "--pretraining_steps", dest="pretraining_steps", type=int, default=PRETRAINING_STEPS,
        help=f"steps of the tower's pretraining (default {PRETRAINING_STEPS}; 0 keeps the random tower)",
    )
    trained = commands.add_parser("train", help=f"train the model with tokenpacker-train on {TRAINING_THREADS} threads")
    trained.add_argument("--data-dir", "--data_dir", dest="data_dir", required=True, help="the folder of `data`")
    trained.add_argument("--base-dir", "--base_dir", dest="base_dir", required=True, help="the folder of `base`")
    trained.add_argument("--output-dir", "--output_dir", dest="output_dir", required=True)
    trained.add_argument("--max-steps", "--max_steps", dest="max_steps", type=int, default=MAX_STEPS)
    again = commands.add_parser(
        "reproduce", help="data, base, train and evaluate into one folder; compare the weights with the shipped ones"
    )
    again.add_argument("--output-dir", "--output_dir", dest="output_dir", required=True, help="a new or empty folder")
    again.add_argument("--num-train", "--num_train", dest="num_train", type=int, default=NUM_TRAIN)
    again.add_argument("--num-test", "--num_test", dest="num_test", type=int, default=NUM_TEST)
    again.add_argument(
        "--pretraining-steps", "--pretraining_steps", dest="pretraining_steps", type=int, default=PRETRAINING_STEPS
    )
    again.add_argument("--max-steps", "--max_steps", dest="max_steps", type=int, default=MAX_STEPS)
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
    elif args.command == "reproduce":
        if args.max_steps < 1 or args.pretraining_steps < 0 or args.num_train < 1 or args.num_test < 1:
            parser.error("--max-steps, --num-train and --num-test must be positive, --pretraining-steps not negative")
        try:
            results = reproduce(
                args.output_dir, args.num_train, args.num_test, args.pretraining_steps, args.max_steps,
                log=partial(print, flush=True),
            )
        except FileExistsError as error:
            parser.error(str(error))
        identical = results.pop("identical to shipped", None)
        print(json.dumps(results, indent=1))
        if identical is None:
            print("Not the shipped model's settings: the weights are not compared with the shipped ones.")
        else:
            model_file = Path(args.output_dir) / "tiny-shapes" / "model.safetensors"
            verdict = "byte for byte the same as" if identical else "different from"
            print(f"{model_file} is {verdict} {PRETRAINED / 'model.safetensors'}")
            if not identical:
                sys.exit(1)
    elif args.command == "base":
        if args.pretraining_steps < 0:
            parser.error(f"--pretraining-steps must be a non-negative integer, got {args.pretraining_steps}")
        with training_threads():
            folder = write_base_models(args.output_dir, args.pretraining_steps, log=partial(print, flush=True))
        print(f"Wrote the vision tower to {folder / 'vision'}, the language model and tokenizer to {folder / 'text'}")
    elif args.command == "train":
        from .training import main as train_main

        if args.max_steps < 1:
            parser.error(f"--max-steps must be a positive integer, got {args.max_steps}")
        arguments = training_arguments(args.data_dir, args.base_dir, args.output_dir, args.max_steps)
        print(f"tokenpacker-train {' '.join(arguments)}  (on {TRAINING_THREADS} threads)", flush=True)
        with training_threads():
            train_main(arguments)
    else:
        from .modeling import TokenPackerForConditionalGeneration
        from .processing import TokenPackerProcessor

        model = TokenPackerForConditionalGeneration.from_pretrained(args.model)
        processor = TokenPackerProcessor.from_pretrained(args.model)
        print(json.dumps(evaluate(model, processor, args.data_path), indent=1))


if __name__ == "__main__":
    main()
