"""`tokenpacker-eval generate`: a TokenPacker checkpoint answers a question file of the original's evaluation scripts,
into the answers jsonl that the original's scorers and converters read.

Each prompt is the original's: "<image>\\n" and the question as the user turn of the Vicuna v1 conversation, written
by the processor's chat template, with the "pad" or "slice" crops of the model's processor. Answers are appended line
by line and made durable after every batch: a run that stops continues when started again, skipping the questions
already answered (a torn last line is dropped). Under `accelerate launch --num_processes N` (or torchrun) every
process answers its share of each step and the main process writes the one answers file, in question order. `--backend vllm` answers
through vLLM's engine with this package's `tokenpacker.serving` plugin instead, parallel through its own
`--tensor-parallel-size`.

vLLM is imported only for `--backend vllm`; the model's packages never import this module.
"""

import argparse
import json
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object, parse_flag_from_env
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

from ..checks import check_folder
from ..distributed import end_process_group
from .questions import SINGLE_PRED_PROMPTS, Question, read_questions

CONV_MODE = "vicuna_v1"
BACKENDS = ("transformers", "vllm")
DEFAULT_BATCH_SIZES = {"transformers": 1, "vllm": 64}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# shortuuid's alphabet (the original's answer ids): digits and letters without 0, 1, I, O and l
ANSWER_ID_ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


@dataclass(frozen=True)
class GenerationSettings:
    temperature: float = 0.0
    top_p: float | None = None
    num_beams: int = 1
    max_new_tokens: int = 128

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0


def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    """Registers `generate` on the `tokenpacker-eval` sub-command parsers."""
    parser = subparsers.add_parser(
        "generate",
        help="answer a question file (jsonl, ScienceQA json or MMBench tsv) into an answers jsonl",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--model-path", required=True, help="a TokenPacker checkpoint: folder or Hub repo id")
    parser.add_argument("--question-file", required=True, help=".jsonl, ScienceQA .json or MMBench .tsv")
    parser.add_argument("--image-folder", default="", help="the folder the question file's image names are in")
    parser.add_argument(
        "--answers-file", required=True, help="the answers jsonl; answers already in it are kept and skipped"
    )
    parser.add_argument(
        "--conv-mode", default=CONV_MODE, help=f"the conversation template; only {CONV_MODE} (the default)"
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (the default) answers greedily")
    parser.add_argument("--top-p", "--top_p", type=float, default=None, help="nucleus sampling, with --temperature")
    parser.add_argument("--num-beams", "--num_beams", type=int, default=1, help="beam search width (default: 1)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest answer in tokens (default: 128)")
    parser.add_argument(
        "--single-pred-prompt",
        action="store_true",
        help=f"ScienceQA and MMBench: end each question with {SINGLE_PRED_PROMPTS['en']!r}",
    )
    parser.add_argument("--all-rounds", action="store_true", help="MMBench: ask once per rotation of the options")
    parser.add_argument("--lang", default="en", choices=sorted(SINGLE_PRED_PROMPTS), help="MMBench: language of "
                        "--single-pred-prompt's instruction (default: en)")  # fmt: skip
    parser.add_argument("--backend", default="transformers", choices=BACKENDS, help="default: transformers")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="questions per batch, left-padded (default: 1 with transformers, as the original; 64 with vllm)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="weights and activations (default auto: bfloat16 on GPUs as the original, float32 on CPUs)",
    )
    parser.add_argument("--device", default=None, help="transformers: cpu, cuda, cuda:1... (default: accelerate's)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm: GPUs per model (default: 1)")
    parser.add_argument(
        "--enforce-eager", action="store_true", help="vllm: no compilation or graphs (starts faster, runs slower)"
    )
    parser.set_defaults(func=generate_command)
    return parser


def generate_command(args: argparse.Namespace) -> int:
    """Runs `generate` from parsed arguments; bad arguments and inputs raise ValueError naming the problem."""
    settings = checked_settings(args)
    batch_size = args.batch_size if args.batch_size is not None else DEFAULT_BATCH_SIZES[args.backend]
    questions = read_questions(
        args.question_file, args.image_folder, args.single_pred_prompt, args.all_rounds, args.lang
    )
    check_folder(args.model_path)
    # Processes started by `accelerate launch` or torchrun work together on CPUs too (gloo) when there is no GPU.
    state = PartialState(cpu=not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU"))
    if args.backend == "vllm" and state.num_processes > 1:
        raise ValueError(
            "--backend vllm runs one engine: start it without `accelerate launch` and spread it over GPUs with "
            "--tensor-parallel-size"
        )
    if args.device is not None and state.num_processes > 1:
        raise ValueError("--device names one device; under `accelerate launch` each process uses its own")
    answers = AnswersFile(args.answers_file)
    answered = [answers.resume(questions) if state.is_main_process else None]
    broadcast_object_list(answered)
    pending = [question for question in questions if question.key not in answered[0]]
    if not pending:
        if state.is_main_process:
            print(f"All {len(questions)} questions of {args.question_file} are answered in {answers.path}")
        end_process_group()
        return 0

    device = _device(args.device) if args.device is not None else state.device
    dtype = DTYPES.get(args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.backend == "vllm":
        answerer = VllmAnswerer(args.model_path, settings, dtype, args.tensor_parallel_size, args.enforce_eager)
    else:
        answerer = TransformersAnswerer(args.model_path, settings, device, dtype)
    if state.is_main_process:
        processes = f"{state.num_processes} processes" if state.num_processes > 1 else "1 process"
        print(
            f"Answering {len(pending)} of {len(questions)} questions with {args.backend} ({processes}, batches of "
            f"{batch_size})",
            file=sys.stderr,
        )
    try:
        written = answer_questions(
            answerer, pending, answers, model_id(args.model_path), batch_size, state, total=len(questions)
        )
    except KeyboardInterrupt:
        print(f"Stopped: the answers so far are in {answers.path}; the same command continues", file=sys.stderr)
        return 130
    if state.is_main_process:
        print(f"Wrote {written} answers to {answers.path} ({len(questions) - len(pending)} were there already)")
    end_process_group()
    return 0


def checked_settings(args: argparse.Namespace) -> GenerationSettings:
    if args.conv_mode != CONV_MODE:
        raise ValueError(
            f"--conv-mode {args.conv_mode!r} is not supported: TokenPacker's checkpoints were trained and evaluated "
            f"with {CONV_MODE} (the processor's chat template), which every original evaluation script passes"
        )
    counts = {
        "--num-beams": args.num_beams,
        "--max-new-tokens": args.max_new_tokens,
        "--batch-size": args.batch_size,
        "--tensor-parallel-size": args.tensor_parallel_size,
    }
    for flag, value in counts.items():
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    if not args.temperature >= 0:
        raise ValueError(f"--temperature must be 0 (greedy) or positive, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.backend == "vllm" and args.device is not None:
        raise ValueError("--device is for --backend transformers; vLLM places its engine itself")
    if args.backend != "vllm" and (args.tensor_parallel_size != 1 or args.enforce_eager):
        raise ValueError(
            "--tensor-parallel-size and --enforce-eager are for --backend vllm; with transformers, `accelerate "
            "launch` spreads the questions over processes"
        )
    if args.backend == "vllm" and args.num_beams != 1:
        raise ValueError("--num-beams above 1 needs --backend transformers (vLLM samples or answers greedily)")
    return GenerationSettings(args.temperature, args.top_p, args.num_beams, args.max_new_tokens)


def model_id(model_path: str | os.PathLike) -> str:
    """The answers' `model_id`, named as the original does: the folder's name, or "run_checkpoint-N" for a checkpoint
    folder of a training run."""
    parts = str(model_path).rstrip("/").split("/")
    return f"{parts[-2]}_{parts[-1]}" if parts[-1].startswith("checkpoint-") and len(parts) > 1 else parts[-1]


def new_answer_id() -> str:
    """A random 22-character id like the original's `shortuuid.uuid()` (about 128 random bits)."""
    return "".join(secrets.choice(ANSWER_ID_ALPHABET) for _ in range(22))


class AnswersFile:
    """An answers jsonl that only ever grows by whole lines."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def resume(self, questions: list[Question]) -> set[tuple]:
        """The keys of the questions already answered in the file.

        A last line without its newline is what a run killed while writing leaves: it is cut off (the lines before it
        stay). Any other line that is not an answer to one of `questions` means the file belongs to another run, and
        raises ValueError.
        """
        if not self.path.exists():
            return set()
        if not self.path.is_file():
            raise ValueError(f"answers file {self.path} is not a file")
        data = self.path.read_bytes()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            os.truncate(self.path, complete)
        known = {question.key for question in questions}
        answered = set()
        for number, line in enumerate(data[:complete].splitlines(), start=1):
            try:
                record = json.loads(line)
                key = (record["question_id"], record.get("round_id"))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                raise ValueError(
                    f"answers file {self.path} line {number} is not an answer line (JSON with a question_id); "
                    "give another --answers-file"
                ) from None
            if key not in known:
                raise ValueError(
                    f"answers file {self.path} line {number} answers question {key[0]!r}, which is not in this "
                    "question file: the file holds another run's answers; give another --answers-file"
                )
            answered.add(key)
        return answered

    def append(self, records: list[dict]) -> None:
        """Appends one line per record and returns once they are on disk."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as file:
            file.write("".join(json.dumps(record) + "\n" for record in records))
            file.flush()
            os.fsync(file.fileno())


def chat(question: Question, image=None) -> list[dict]:
    """The question as one user turn: its image (when it has one) and its text, as the original asks it."""
    content = [{"type": "text", "text": question.text}]
    if question.image is not None:
        content.insert(0, {"type": "image", **({"image": image} if image is not None else {})})
    return [{"role": "user", "content": content}]


class TransformersAnswerer:
    """Answers batches of questions with transformers' `generate`, prompts left-padded."""

    def __init__(self, model_path, settings: GenerationSettings, device: torch.device, dtype: torch.dtype):
        self.processor = AutoProcessor.from_pretrained(model_path)
        self.model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=dtype).to(device).eval()
        self.device, self.dtype = device, dtype
        generation_config = self.model.generation_config
        pad_token_id = generation_config.pad_token_id
        if pad_token_id is None:
            pad_token_id = self.processor.tokenizer.pad_token_id
        # `<image>` and padding are never answers (vLLM's model masks them likewise).
        suppressed = set(generation_config.suppress_tokens or []) | {self.model.config.image_token_id, pad_token_id}
        self.generate_kwargs = dict(
            max_new_tokens=settings.max_new_tokens,
            num_beams=settings.num_beams,
            do_sample=settings.do_sample,
            suppress_tokens=sorted(suppressed - {None}),
            pad_token_id=pad_token_id,
        )
        if settings.do_sample:
            self.generate_kwargs.update(temperature=settings.temperature, top_p=settings.top_p)

    @torch.inference_mode()
    def answer(self, questions: list[Question]) -> list[str]:
        conversations = [chat(question, question.load_image()) for question in questions]
        inputs = self.processor.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        generated = self.model.generate(**inputs, **self.generate_kwargs)
        answers = self.processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return [answer.strip() for answer in answers]


class VllmAnswerer:
    """Answers batches of questions with vLLM's offline engine and this package's vLLM model."""

    def __init__(
        self,
        model_path,
        settings: GenerationSettings,
        dtype: torch.dtype,
        tensor_parallel_size: int = 1,
        enforce_eager: bool = False,
    ):
        try:
            from vllm import LLM, SamplingParams
        except ImportError as error:
            raise ValueError(
                f"--backend vllm needs vLLM ({error}): pip install -e '.[vllm]' on GPUs, or "
                "`bash tokenpacker/serving/setup_cpu_env.sh` for its CPU build"
            ) from None
        self.processor = AutoProcessor.from_pretrained(model_path)
        self.engine = LLM(
            model=str(model_path),
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            limit_mm_per_prompt={"image": 1},
            enforce_eager=enforce_eager,
        )
        self.sampling = SamplingParams(
            temperature=settings.temperature, top_p=settings.top_p or 1.0, max_tokens=settings.max_new_tokens
        )

    def answer(self, questions: list[Question]) -> list[str]:
        prompts = []
        for question in questions:
            prompt = {"prompt": self.processor.apply_chat_template(chat(question), add_generation_prompt=True)}
            image = question.load_image()
            if image is not None:
                prompt["multi_modal_data"] = {"image": image}
            prompts.append(prompt)
        outputs = self.engine.generate(prompts, self.sampling, use_tqdm=False)
        token_ids = [list(output.outputs[0].token_ids) for output in outputs]
        return [answer.strip() for answer in self.processor.batch_decode(token_ids, skip_special_tokens=True)]


def answer_questions(
    answerer,
    questions: list[Question],
    answers: AnswersFile,
    model_name: str,
    batch_size: int,
    state: PartialState,
    total: int | None = None,
) -> int:
    """Answers `questions` in steps of `batch_size` per process and appends them to `answers` in their order.

    In each step, process k answers the k-th batch of the step's questions; the main process gathers the answers and
    writes them. Returns the number of answers written; a progress bar with questions per second goes to stderr.
    """
    total = len(questions) if total is None else total
    step = batch_size * state.num_processes
    progress = tqdm(
        total=total,
        initial=total - len(questions),
        unit="question",
        file=sys.stderr,
        disable=not state.is_main_process,
    )
    with progress:
        for start in range(0, len(questions), step):
            share = questions[start + state.process_index * batch_size : start + (state.process_index + 1) * batch_size]
            texts = answerer.answer(share) if share else []
            if state.num_processes > 1:
                texts = gather_object(texts)
            if state.is_main_process:
                step_questions = questions[start : start + step]
                answers.append(
                    [
                        question.answer_record(text, new_answer_id(), model_name)
                        for question, text in zip(step_questions, texts, strict=True)
                    ]
                )
                progress.update(len(step_questions))
    return len(questions)


def _device(name: str) -> torch.device:
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must name a torch device (cpu, cuda, cuda:1...), got {name!r}") from None


__all__ = ["AnswersFile", "GenerationSettings", "TransformersAnswerer", "VllmAnswerer", "add_generate_parser"]
