"""Reading answers and annotation files with errors that name the file and the problem; writing outputs whole."""

import csv
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

QUESTION_ID = (int, str)


def existing_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if not path.is_file():
        raise ValueError(f"{what} {path} is not a file")
    return path


def existing_folder(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"{what} {path} is not a folder")
    return path


def read_text(path: Path, what: str) -> str:
    try:
        return existing_file(path, what).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{what} {path} is not UTF-8 text ({error})") from None


def read_json(path: str | os.PathLike, what: str, expected: type) -> dict | list:
    """The JSON document of `path`, which must be a `expected` (dict or list)."""
    text = read_text(Path(path), what)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} {path} is not JSON ({error})") from None
    if not isinstance(document, expected):
        raise ValueError(f"{what} {path} holds a JSON {type(document).__name__}, expected a JSON {expected.__name__}")
    return document


def read_jsonl(path: str | os.PathLike, what: str, fields: dict[str, type | tuple]) -> list[dict]:
    """The records of a JSON-lines file (blank lines skipped), each an object holding `fields` of their types."""
    records = []
    for number, line in enumerate(read_text(Path(path), what).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{what} {path} line {number} is not JSON ({error})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{what} {path} line {number} is a JSON {type(record).__name__}, expected an object")
        missing = [field for field in fields if field not in record]
        if missing:
            raise ValueError(f"{what} {path} line {number} has no {', '.join(map(repr, missing))} field")
        for field, types in fields.items():
            if not isinstance(record[field], types) or isinstance(record[field], bool):
                raise ValueError(
                    f"{what} {path} line {number}: {field!r} is {record[field]!r}, expected {_type_names(types)}"
                )
        records.append(record)
    if not records:
        raise ValueError(f"{what} {path} holds no records")
    return records


def read_answers(path: str | os.PathLike, **fields: type | tuple) -> list[dict]:
    """The records of an answers file written by `tokenpacker-eval generate` (or the original's scripts)."""
    return read_jsonl(path, "answers file", {"question_id": QUESTION_ID, "text": str, **fields})


def _type_names(types: type | tuple) -> str:
    return " or ".join(kind.__name__ for kind in (types if isinstance(types, tuple) else (types,)))


def read_tsv(path: str | os.PathLike, what: str, columns: Iterable[str]) -> tuple[list[str], list[dict]]:
    """The header and rows of a tab-separated file with a header line holding `columns`."""
    text = read_text(Path(path), what)
    csv.field_size_limit(2**31 - 1)  # MMBench's rows carry whole base64 images
    try:
        reader = csv.DictReader(text.splitlines(), delimiter="\t")
        header = list(reader.fieldnames or [])
        rows = list(reader)
    except csv.Error as error:
        raise ValueError(f"{what} {path} is not a tab-separated table ({error})") from None
    missing = [column for column in columns if column not in header]
    if missing:
        raise ValueError(f"{what} {path} has no {', '.join(map(repr, missing))} column (its columns: {header})")
    if not rows:
        raise ValueError(f"{what} {path} holds no rows")
    return header, rows


def by_question_id(records: list[dict], path: str | os.PathLike, key: Callable[[dict], object] = None) -> dict:
    """The answers records by question id (or by `key`), refusing a question answered twice."""
    key = key or (lambda record: record["question_id"])
    indexed = {}
    for record in records:
        if key(record) in indexed:
            raise ValueError(f"answers file {path} answers question {key(record)!r} more than once")
        indexed[key(record)] = record
    return indexed


def refuse_unknown(ids: Iterable, known: Iterable, answers: str | os.PathLike, questions: str | os.PathLike):
    """Answers for questions that the questions or annotation file does not hold are an error."""
    known = set(known)
    unknown = [question_id for question_id in ids if question_id not in known]
    if unknown:
        raise ValueError(
            f"answers file {answers} answers {len(unknown)} question(s) that {questions} does not hold, "
            f"e.g. {', '.join(map(repr, unknown[:3]))}: are they from another benchmark or split?"
        )


def refuse_unanswered(ids: Iterable, answered: Iterable, answers: str | os.PathLike, questions: str | os.PathLike):
    """Questions without an answer are an error: a score over part of a benchmark is not the benchmark's."""
    answered = set(answered)
    missing = [question_id for question_id in ids if question_id not in answered]
    if missing:
        raise ValueError(
            f"answers file {answers} has no answer for {len(missing)} question(s) of {questions}, "
            f"e.g. {', '.join(map(repr, missing[:3]))}"
        )


def write_output(path: str | os.PathLike, write: Callable[[Path], None], inputs: Iterable, force: bool) -> Path:
    """Writes `path` through `write(temporary_path)` and moves it into place when complete. Refuses to write over
    an input, and over an existing file unless `force`."""
    path = Path(path)
    for source in inputs:
        if source is not None and path.resolve() == Path(source).resolve():
            raise ValueError(f"the output {path} is an input of this command: choose another output file")
    if path.is_dir():
        raise ValueError(f"the output {path} is a folder: give a file name")
    if path.exists() and not force:
        raise FileExistsError(f"the output {path} exists: pass --force (force=True) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def add_output_arguments(parser, required: bool, help: str):
    """`--output` and `--force` of the benchmarks that write a file for an evaluation server."""
    parser.add_argument("--output", required=required, help=help)
    parser.add_argument("--force", action="store_true", help="replace an existing output file")


def write_json(path: str | os.PathLike, data, inputs: Iterable, force: bool) -> Path:
    """Writes `data` as one JSON document (see `write_output`)."""

    def dump(temporary: Path):
        temporary.write_text(json.dumps(data), encoding="utf-8")

    return write_output(path, dump, inputs, force)
