"""TokenPacker end to end on this machine, with nothing to download: `python -m tokenpacker.demo [--random [--hd]]`.

By default it loads the small TokenPacker model trained on the tiny-shapes task that ships with the package
(`tokenpacker/pretrained/tiny-shapes`) with `AutoModelForImageTextToText` and `AutoProcessor`, draws a held-out
scene and asks its questions through `pipeline("image-text-to-text")`, next to the true answers.

`--random` builds a small TokenPacker model with random weights and its own sentencepiece tokenizer instead, saves
it as a Hub folder (cached for the next run), loads it back and asks a question about an image shipped with the
package (`--hd`: in TokenPacker-HD's "slice" mode). The weights are random, so the answer is noise; everything around
it (chat prompt, tokenization, crops, visual token layout, generation) is real.
"""

import argparse
import os
import random
import sys
import time
from importlib.resources import files
from pathlib import Path

import sentencepiece as spm
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

from . import TokenPackerConfig, TokenPackerForConditionalGeneration, TokenPackerProcessor, __version__
from .building import generation_config_for
from .chat_session import describe_image
from .processing import fast_tokenizer_from_sentencepiece, train_llama_sentencepiece
from .shapes import PRETRAINED, QUESTION_KINDS, render_scene
from .staging import OutputFolder

DEMO_IMAGE = files("tokenpacker") / "assets" / "demo.png"
QUESTION = "What shapes are in this image, and what colour are they?"
VOCABULARY_WORDS = (
    "a the this that there is are was what which how many image picture shows show see left right top bottom "
    "middle red green blue yellow black white grey colour color shape shapes square circle triangle line big "
    "small and of in on with next to one two three four five I you it answer question user assistant , . ? !"
).split()


def demo_config(model_file: str | os.PathLike, hd: bool) -> TokenPackerConfig:
    """A small TokenPacker: CLIP-like tower on 336-pixel crops (24x24 patches -> 144 tokens), a 2-layer Llama.

    The HD separators are looked up like the original does, with sentencepiece's `piece_to_id` (',' is a piece,
    '\n' is not and gets the unknown-token id).
    """
    tokenizer = fast_tokenizer_from_sentencepiece(model_file)
    pieces = spm.SentencePieceProcessor(model_file=str(model_file))
    return TokenPackerConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=6,
            num_attention_heads=4,
            image_size=336,
            patch_size=14,
        ),
        text_config=dict(
            model_type="llama",
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=4096,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        multi_level_feature_layers=[2, 3, 4, 5],
        vision_feature_layer=-2,
        projector_hidden_size=64,
        projector_num_heads=4,
        image_aspect_ratio="slice" if hd else "pad",
        slice_separator_token_id=pieces.piece_to_id(","),
        row_separator_token_id=pieces.piece_to_id("\n"),
    )


def save_random_checkpoint(
    folder: str | os.PathLike, config: TokenPackerConfig, model_file: str | os.PathLike
) -> Path:
    """Saves a TokenPackerForConditionalGeneration with random weights and its processor in `folder`.

    The tokenizer comes from the sentencepiece `model_file`. Generation is kept from emitting `<image>` and `<pad>`,
    which a random model could otherwise pick. The folder is for this package (the demo loads it with tokenpacker
    installed), so no remote code is exported into it.
    """
    folder = Path(folder)
    tokenizer = fast_tokenizer_from_sentencepiece(model_file)
    if len(tokenizer) > config.text_config.vocab_size:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the text model only {config.text_config.vocab_size}"
        )
    processor = TokenPackerProcessor.from_model_config(config, tokenizer)
    model = TokenPackerForConditionalGeneration(config).eval()
    model.generation_config = generation_config_for(config, tokenizer.pad_token_id)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_demo_checkpoint(folder: str | os.PathLike, hd: bool) -> Path:
    """Trains the demo's sentencepiece tokenizer and saves a random-weight demo model with it in `folder`, built
    beside it and moved into place once complete (`tokenpacker.staging`), so that an interrupted build leaves no
    folder that looks like a model."""
    with OutputFolder(folder, activity="building") as staging:
        rng = random.Random(0)
        sentences = [" ".join(rng.choice(VOCABULARY_WORDS) for _ in range(12)) for _ in range(3000)]
        model_file = train_llama_sentencepiece(staging.path / "tokenizer.model", sentences, vocab_size=500)
        torch.manual_seed(0)
        save_random_checkpoint(staging.path, demo_config(model_file, hd), model_file)
        staging.commit()
    return Path(folder)


def default_folder(hd: bool) -> Path:
    """Where the demo model is cached: the user's cache directory, one folder per mode and package version."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "tokenpacker" / f"demo-{'hd' if hd else 'pad'}-{__version__}"


def is_checkpoint(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ("config.json", "model.safetensors", "processor_config.json"))


def trained_model_demo(scene_index: int, question: str | None, max_new_tokens: int) -> int:
    """The shipped tiny-shapes model answers questions about a held-out scene."""
    load_start = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(PRETRAINED)
    processor = AutoProcessor.from_pretrained(PRETRAINED)
    answerer = pipeline("image-text-to-text", model=model, processor=processor)
    load_seconds = time.perf_counter() - load_start
    scene = render_scene("test", scene_index)
    truths = dict(scene.questions())
    questions = [question] if question is not None else [scene.questions(kind)[0][0] for kind in QUESTION_KINDS]
    print(f"Model: {PRETRAINED} (trained on tiny shapes; `--random` for the random-weight model)")
    width, height = scene.image.size
    print(f"Image: held-out tiny-shapes scene {scene_index} ({width}x{height}): {scene.description}")
    answer_start = time.perf_counter()
    for text in questions:
        messages = [{"role": "user", "content": [{"type": "image", "image": scene.image}, {"type": "text", "text": text}]}]
        answer = answerer(text=messages, max_new_tokens=max_new_tokens, return_full_text=False)[0]["generated_text"]
        truth = f" (true answer: {truths[text]})" if text in truths else ""
        print(f"Question: {text}\nAnswer: {answer}{truth}")
    answer_seconds = time.perf_counter() - answer_start
    config = model.config
    grid, scale = config.patch_grid_size, config.scale_factor
    print(
        f"Visual tokens: {config.num_image_tokens} for the image (each packs a {scale}x{scale} region of the "
        f"{grid}x{grid} patch grid)"
    )
    print(f"Time: {answer_seconds:.1f} s to answer, {load_seconds:.1f} s to load the model")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenpacker.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--random", action="store_true", help="a random-weight model instead of the trained one")
    parser.add_argument("--hd", action="store_true", help="with --random: slice the image into a grid of crops")
    parser.add_argument("--output", type=Path, help="with --random: folder for the model (default: the user's cache)")
    parser.add_argument("--scene", type=int, default=0, help="the held-out tiny-shapes scene to ask about")
    parser.add_argument("--question", help="the question to ask (default: the scene's questions)")
    parser.add_argument("--max-new-tokens", type=int, default=20, help="length of the answer in tokens")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}")
    if not args.random:
        if args.hd or args.output is not None:
            parser.error("--hd and --output go with --random: the trained tiny-shapes model is a 'pad' model")
        if args.scene < 0:
            parser.error(f"--scene must be a non-negative integer, got {args.scene}")
        return trained_model_demo(args.scene, args.question, args.max_new_tokens)
    return random_model_demo(parser, args)


def random_model_demo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """A random-weight model, built and cached on the spot, answers (noise) about the shipped demo image."""
    question = args.question if args.question is not None else QUESTION
    load_start = time.perf_counter()
    folder = args.output or default_folder(args.hd)
    if args.output is not None and folder.exists() and any(folder.iterdir()) and not is_checkpoint(folder):
        parser.error(f"--output {folder} is neither empty nor a demo model folder")
    if is_checkpoint(folder):
        print(f"Reusing the demo model in {folder}")
    else:
        build_demo_checkpoint(folder, args.hd)
        print(f"Built a random-weight TokenPacker model and saved it in {folder}")

    model = AutoModelForImageTextToText.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    answerer = pipeline("image-text-to-text", model=model, processor=processor)
    with Image.open(DEMO_IMAGE) as image:
        image = image.convert("RGB")
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}
    ]

    # Byte-fallback pieces are kept out of the answer too, and repeats are damped, so that the noise reads as words.
    byte_pieces = [token_id for token, token_id in processor.tokenizer.get_vocab().items() if token.startswith("<0x")]
    generate_kwargs = dict(
        suppress_tokens=model.generation_config.suppress_tokens + byte_pieces, repetition_penalty=1.5
    )
    load_seconds = time.perf_counter() - load_start
    answer_start = time.perf_counter()
    answer = answerer(
        text=messages, max_new_tokens=args.max_new_tokens, return_full_text=False, generate_kwargs=generate_kwargs
    )[0]["generated_text"]
    answer_seconds = time.perf_counter() - answer_start

    mode = "TokenPacker-HD ('slice')" if args.hd else "TokenPacker ('pad', LLaVA-1.5 layout)"
    print(f"Mode: {mode}, image {image.width}x{image.height} ({DEMO_IMAGE})")
    print(f"Question: {question}")
    print(f"Answer: {answer}")
    print(f"Visual tokens: {describe_image(processor, image).summary()}")
    print(f"Time: {answer_seconds:.1f} s to answer, {load_seconds:.1f} s to build or load the model")
    print(
        "The weights are random, so the answer is noise: this demo shows the whole path (Hub folder, Auto classes, "
        "chat template, crops, visual tokens, generation), not a trained model."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
