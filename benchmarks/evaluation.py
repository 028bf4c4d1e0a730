"""Questions per second of `tokenpacker-eval generate`: the original's procedure (one question at a time, as its
model_vqa_loader.py does) beside batches of 16 with transformers and, where vLLM is installed, vLLM's engine.

The same questions for every procedure: the first N questions of the held-out tiny-shapes scenes, in the original's
jsonl format. Two models:
- tiny-shapes: the shipped model (a 12x12-patch tower, 36 visual tokens, 3 Llama layers of width 128); answers of a
  word or two;
- random: random weights, a tower on CLIP ViT-L/14-336's 24x24 patch grid (width 256, 6 layers), 144 visual tokens,
  4 Llama layers of width 512; its answers run to `--max-new-tokens`.
Each procedure answers through `answer_questions` (the command's own loop, answers file included) after loading and
one warm-up batch; the table says whether its answers equal the one-at-a-time answers.

    .venv/bin/python benchmarks/evaluation.py [--questions 32] [--models tiny-shapes random]
    VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python benchmarks/evaluation.py   # adds vLLM's engine
"""

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import AutoTokenizer

from tokenpacker import TokenPackerConfig, TokenPackerForConditionalGeneration, TokenPackerProcessor
from tokenpacker.building import generation_config_for
from tokenpacker.evaluation.generate import (
    AnswersFile,
    GenerationSettings,
    TransformersAnswerer,
    VllmAnswerer,
    answer_questions,
)
from tokenpacker.evaluation.questions import read_questions
from tokenpacker.shapes import PRETRAINED
from tokenpacker.testing import write_shapes_questions

BATCH_SIZE = 16
VLLM_BATCH_SIZE = 64


def write_random_model(folder: Path) -> Path:
    """A random-weight TokenPacker with the tiny-shapes tokenizer, at a size where compute outweighs the overheads."""
    tokenizer = AutoTokenizer.from_pretrained(PRETRAINED)
    config = TokenPackerConfig(
        vision_config=dict(
            model_type="clip_vision_model", hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
            num_attention_heads=4, image_size=336, patch_size=14,
        ),
        text_config=dict(
            model_type="llama", hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=8, vocab_size=len(tokenizer), max_position_embeddings=1024,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), multi_level_feature_layers=[3, 4, 5, 5],
        projector_hidden_size=256, projector_num_heads=4, scale_factor=2, slice_separator_token_id=0,
        row_separator_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = TokenPackerForConditionalGeneration(config).eval()
    model.generation_config = generation_config_for(config, tokenizer.pad_token_id)
    model.save_pretrained(folder)
    TokenPackerProcessor.from_model_config(config, tokenizer).save_pretrained(folder)
    return folder


def timed_run(answerer, questions, batch_size: int, folder: Path, name: str) -> tuple[float, list[str]]:
    """Questions per second of the command's loop after one warm-up batch, and the answers."""
    state = PartialState()
    answer_questions(answerer, questions[:batch_size], AnswersFile(folder / f"{name}-warm-up.jsonl"), name, batch_size,
                     state)  # fmt: skip
    answers = AnswersFile(folder / f"{name}.jsonl")
    start = time.perf_counter()
    answer_questions(answerer, questions, answers, name, batch_size, state)
    seconds = time.perf_counter() - start
    texts = [json.loads(line)["text"] for line in answers.path.read_text().splitlines()]
    return len(questions) / seconds, texts


def benchmark_model(model_dir: Path, questions, settings: GenerationSettings, args, folder: Path) -> list[dict]:
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    answerer = TransformersAnswerer(model_dir, settings, torch.device(args.device), dtype)
    rows = []
    one_rate, reference = timed_run(answerer, questions, 1, folder, f"{model_dir.name}-one")
    rows.append({"procedure": "one question at a time (the original's)", "rate": one_rate, "same": True})
    rate, texts = timed_run(answerer, questions, BATCH_SIZE, folder, f"{model_dir.name}-batched")
    rows.append({"procedure": f"transformers, --batch-size {BATCH_SIZE}", "rate": rate, "same": texts == reference})
    del answerer
    if importlib.util.find_spec("vllm") is not None:
        engine = VllmAnswerer(model_dir, settings, dtype)
        rate, texts = timed_run(engine, questions, VLLM_BATCH_SIZE, folder, f"{model_dir.name}-vllm")
        rows.append({"procedure": f"vllm, --batch-size {VLLM_BATCH_SIZE}", "rate": rate, "same": texts == reference})
        del engine
    for row in rows:
        row["speed-up"] = row["rate"] / one_rate
    return rows


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=32, help="questions per procedure (default: 32)")
    parser.add_argument("--models", nargs="+", default=["tiny-shapes", "random"], choices=["tiny-shapes", "random"])
    parser.add_argument("--max-new-tokens", type=int, default=16, help="longest answer (default: 16)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads of the transformers runs (default: 1, as vLLM's CPU worker, which keeps a core for itself)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.questions < 1 or args.threads < 1:
        parser.error(f"--questions and --threads must be positive integers, got {args.questions} and {args.threads}")
    torch.set_num_threads(args.threads)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        write_shapes_questions(folder / "shapes", args.questions)  # at least one question per scene
        questions = read_questions(folder / "shapes" / "questions.jsonl", folder / "shapes" / "images")
        questions = questions[: args.questions]
        print(f"{len(questions)} tiny-shapes questions, answers of at most {args.max_new_tokens} tokens, "
              f"{args.device}, torch {torch.__version__} with {torch.get_num_threads()} threads\n")  # fmt: skip
        print("| model | procedure | questions/s | speed-up | same answers |")
        print("|---|---|---|---|---|")
        for name in args.models:
            model_dir = PRETRAINED if name == "tiny-shapes" else write_random_model(folder / "random")
            for row in benchmark_model(model_dir, questions, settings, args, folder):
                same = "yes" if row["same"] else "no"
                print(f"| {name} | {row['procedure']} | {row['rate']:.1f} | {row['speed-up']:.1f}x | {same} |")


if __name__ == "__main__":
    main()
