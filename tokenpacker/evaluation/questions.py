"""The question files of the original's evaluation scripts, read into `Question`s, checked before a model loads.

Three formats, told apart by the file's suffix:
- `.jsonl` (model_vqa_loader.py, model_vqa.py: VQAv2, GQA, VizWiz, TextVQA, POPE, MME, MM-Vet): one JSON object a
  line with `question_id`, `image` (relative to the image folder), `text` (the prompt suffixes such as "Answer the
  question using a single word or phrase." are part of it) and optional fields such as `category`.
- `.json` (model_vqa_science.py: ScienceQA): a list of `{"id", "conversations", "image" (optional)}`; the question is
  the first turn's value without its `<image>` marker; questions without an image are asked as text alone.
- `.tsv` (model_vqa_mmbench.py: MMBench): columns `index`, `question`, `hint`, `image` (base64) and options `A`-`D`;
  the hint, question and options make the prompt, and `--all-rounds` asks each question once per rotation of its
  options.
"""

import base64
import binascii
import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

SINGLE_PRED_PROMPTS = {
    "en": "Answer with the option's letter from the given choices directly.",
    "cn": "请直接回答选项字母。",
}
MMBENCH_OPTIONS = ("A", "B", "C", "D")
MMBENCH_COLUMNS = ("index", "question", "image", "A")
# The strings pandas' `read_table` reads as missing (NaN), which the original's MMBench reader treats as no hint / no
# more options, as it does "nan" and "none" in any case.
_MISSING_TEXTS = {
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA",
    "NULL", "NaN", "None", "n/a", "nan", "null",
}  # fmt: skip
_INTEGER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Question:
    """One question to answer.

    `text` is the user message after the image (the chat template puts "<image>\\n" before it); `image` is an image
    file, the bytes of an image (MMBench) or None (a text-only ScienceQA question); `answer_fields` are the fields of
    the answer record besides its text, ids and metadata, in the original's order; `where` names the question's place
    in its file for messages.
    """

    text: str
    image: Path | bytes | None
    answer_fields: dict
    where: str

    @property
    def key(self) -> tuple:
        """What tells this question's answer apart in an answers file: its id and, for MMBench, its round."""
        return (self.answer_fields["question_id"], self.answer_fields.get("round_id"))

    def load_image(self) -> Image.Image | None:
        if self.image is None:
            return None
        source = self.image if isinstance(self.image, Path) else io.BytesIO(self.image)
        try:
            with Image.open(source) as image:
                return image.convert("RGB")
        except OSError as error:
            name = self.image if isinstance(self.image, Path) else "its base64 image"
            raise ValueError(f"{self.where}: cannot read {name} as an image ({error})") from error

    def answer_record(self, text: str, answer_id: str, model_id: str) -> dict:
        """The answer line of the original's scripts: the text comes right after the prompt."""
        record = {}
        for name, value in self.answer_fields.items():
            record[name] = value
            if name == "prompt":
                record["text"] = text
        return {**record, "answer_id": answer_id, "model_id": model_id, "metadata": {}}


def read_questions(
    question_file: str | Path,
    image_folder: str | Path = "",
    single_pred_prompt: bool = False,
    all_rounds: bool = False,
    lang: str = "en",
) -> list[Question]:
    """The questions of a `.jsonl`, ScienceQA `.json` or MMBench `.tsv` question file, in file order.

    Raises ValueError naming the file, line (or row) and problem: an unknown suffix, bad JSON, a missing field or
    column, a missing image file, a question id that comes twice, options that do not apply to the format.
    """
    path = Path(question_file)
    if not path.is_file():
        raise ValueError(f"question file {path} " + ("is a folder, not a file" if path.is_dir() else "does not exist"))
    if lang not in SINGLE_PRED_PROMPTS:
        raise ValueError(f"lang must be one of {sorted(SINGLE_PRED_PROMPTS)}, got {lang!r}")
    suffix = path.suffix.lower()
    if suffix != ".tsv" and (all_rounds or lang != "en"):
        raise ValueError(f"--all-rounds and --lang apply to MMBench .tsv question files, not to {path.name}")
    if suffix == ".jsonl":
        if single_pred_prompt:
            raise ValueError(f"--single-pred-prompt applies to ScienceQA .json and MMBench .tsv files, not {path.name}")
        questions = _read_jsonl(path, Path(image_folder))
    elif suffix == ".json":
        questions = _read_science(path, Path(image_folder), single_pred_prompt)
    elif suffix == ".tsv":
        questions = _read_mmbench(path, single_pred_prompt, all_rounds, SINGLE_PRED_PROMPTS[lang])
    else:
        raise ValueError(
            f"question file {path} must be a .jsonl (VQA-style), .json (ScienceQA) or .tsv (MMBench) file"
        )
    _check_unique(questions, path)
    missing = [question for question in questions if isinstance(question.image, Path) and not question.image.is_file()]
    if missing:
        first = missing[0]
        raise ValueError(
            f"{len(missing)} image(s) of {path} are missing under the image folder {str(image_folder)!r}, "
            f"first: {first.image} ({first.where})"
        )
    return questions


def _read_jsonl(path: Path, image_folder: Path) -> list[Question]:
    questions = []
    with path.open(encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            _require_fields(record, {"question_id": (int, str), "image": str, "text": str}, where)
            fields = {"question_id": record["question_id"], "prompt": record["text"]}
            questions.append(Question(record["text"], image_folder / record["image"], fields, where))
    return questions


def _read_science(path: Path, image_folder: Path, single_pred_prompt: bool) -> list[Question]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: a ScienceQA question file holds a JSON list, got {type(records).__name__}")
    questions = []
    for number, record in enumerate(records):
        where = f"{path} item {number}"
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        _require_fields(record, {"id": (int, str), "conversations": list}, where)
        turns = record["conversations"]
        if not turns or not isinstance(turns[0], dict) or not isinstance(turns[0].get("value"), str):
            raise ValueError(f"{where}: 'conversations' must start with a turn whose 'value' is the question text")
        text = turns[0]["value"].replace("<image>", "").strip()
        prompt = text
        image = None
        if "image" in record:
            _require_fields(record, {"image": str}, where)
            image = image_folder / record["image"]
            prompt = "<image>\n" + prompt
        if single_pred_prompt:
            text += "\n" + SINGLE_PRED_PROMPTS["en"]
            prompt += "\n" + SINGLE_PRED_PROMPTS["en"]
        questions.append(Question(text, image, {"question_id": record["id"], "prompt": prompt}, where))
    return questions


def _read_mmbench(path: Path, single_pred_prompt: bool, all_rounds: bool, instruction: str) -> list[Question]:
    rows, columns = _read_tsv(path)
    missing = [name for name in MMBENCH_COLUMNS if name not in columns]
    if missing:
        raise ValueError(f"{path}: an MMBench file needs the columns {list(MMBENCH_COLUMNS)}; missing {missing}")
    integer_ids = all(_INTEGER.fullmatch(row["index"]) for _, row in rows)
    questions = []
    for number, row in rows:
        where = f"{path} line {number} (index {row['index']})"
        if _is_missing(row["question"]):
            raise ValueError(f"{where}: the question is empty")
        options = []
        for letter in MMBENCH_OPTIONS:
            if _is_missing(row.get(letter, "")):
                break
            options.append(row[letter])
        letters = list(MMBENCH_OPTIONS[: len(options)])
        try:
            image = base64.b64decode(row["image"])
        except binascii.Error:
            raise ValueError(f"{where}: the image column does not hold base64 data") from None
        question_id = int(row["index"]) if integer_ids else row["index"]
        head = row["question"] if _is_missing(row.get("hint", "")) else row["hint"] + "\n" + row["question"]
        for round_id in range(len(options) if all_rounds else 1):
            # the letters stay A, B, C...; `option_char` records which original letter each place now holds
            prompt = head + "".join(f"\n{letter}. {option}" for letter, option in zip(MMBENCH_OPTIONS, options))
            text = prompt + "\n" + instruction if single_pred_prompt else prompt
            fields = {
                "question_id": question_id,
                "round_id": round_id,
                "prompt": prompt,
                "options": options,
                "option_char": letters,
            }
            questions.append(Question(text, image, fields, where))
            options, letters = options[1:] + options[:1], letters[1:] + letters[:1]
    return questions


def _read_tsv(path: Path) -> tuple[list[tuple[int, dict]], list[str]]:
    """(line number, row) pairs and the header of a tab-separated file with a header line, quoted as pandas reads."""
    previous_limit = csv.field_size_limit(2**31 - 1)  # a base64 image is one field
    try:
        with path.open(encoding="utf-8", newline="") as file:
            reader = csv.reader(file, delimiter="\t")
            columns = next(reader, None)
            if columns is None:
                raise ValueError(f"{path} is empty: an MMBench file starts with a header line")
            rows = []
            for values in reader:
                if not any(values):
                    continue
                if len(values) != len(columns):
                    raise ValueError(
                        f"{path} line {reader.line_num}: {len(values)} fields, but the header has {len(columns)}"
                    )
                rows.append((reader.line_num, dict(zip(columns, values))))
    except csv.Error as error:
        raise ValueError(f"{path}: not a readable TSV file ({error})") from None
    finally:
        csv.field_size_limit(previous_limit)
    return rows, columns


def _is_missing(value: str) -> bool:
    return value in _MISSING_TEXTS or value.lower() in ("nan", "none")


def _require_fields(record: dict, types: dict, where: str) -> None:
    for name, kind in types.items():
        if name not in record:
            raise ValueError(f"{where}: the field {name!r} is missing")
        value = record[name]
        if isinstance(value, bool) or not isinstance(value, kind):
            expected = " or ".join(t.__name__ for t in kind) if isinstance(kind, tuple) else kind.__name__
            raise ValueError(f"{where}: {name!r} must be {expected}, got {type(value).__name__}")


def _check_unique(questions: list[Question], path: Path) -> None:
    seen = {}
    for question in questions:
        if question.key in seen:
            raise ValueError(
                f"{path}: the question id {question.key[0]!r} comes twice ({seen[question.key]} and {question.where}); "
                "answers are matched to questions by id"
            )
        seen[question.key] = question.where


__all__ = ["Question", "read_questions"]
