"""`tokenpacker-eval score`: each benchmark's numbers on small files in its real format, worked out by hand in the
tests, the original's parsing quirks, the files written for evaluation servers, the CLI and bad input."""

import argparse
import json
import shutil
from pathlib import Path

import pytest

from tokenpacker.evaluation.scoring import add_score_parser
from tokenpacker.evaluation.scoring.answers import normalize_answer, vqa_accuracy
from tokenpacker.evaluation.scoring.gqa import score_gqa
from tokenpacker.evaluation.scoring.mmbench import infer_letter, score_mmbench
from tokenpacker.evaluation.scoring.mme import read_yes_no, score_mme
from tokenpacker.evaluation.scoring.pope import says_no, score_pope
from tokenpacker.evaluation.scoring.scienceqa import parse_letter, score_scienceqa
from tokenpacker.evaluation.scoring.textvqa import question_of_prompt, score_textvqa
from tokenpacker.evaluation.scoring.vizwiz import score_vizwiz
from tokenpacker.evaluation.scoring.vqav2 import score_vqav2

FIXTURES = Path(__file__).parent / "evaluation_fixtures"
MODEL = "tokenpacker-7b"
POPE = {
    "answers": FIXTURES / f"pope/answers/{MODEL}.jsonl",
    "questions": FIXTURES / "pope/llava_pope_test.jsonl",
    "annotation_dir": FIXTURES / "pope/coco",
}
TEXTVQA = {
    "answers": FIXTURES / f"textvqa/answers/{MODEL}.jsonl",
    "annotations": FIXTURES / "textvqa/TextVQA_0.5.1_val.json",
}
VQAV2 = {
    "answers": FIXTURES / f"vqav2/answers/llava_vqav2_mscoco_test-dev2015/{MODEL}/merge.jsonl",
    "questions": FIXTURES / "vqav2/llava_vqav2_mscoco_test2015.jsonl",
    "annotations": FIXTURES / "vqav2/v2_mscoco_val2014_annotations.json",
}
VIZWIZ = {
    "answers": FIXTURES / f"vizwiz/answers/{MODEL}.jsonl",
    "questions": FIXTURES / "vizwiz/llava_test.jsonl",
    "annotations": FIXTURES / "vizwiz/val.json",
}
GQA = {
    "answers": FIXTURES / f"gqa/answers/llava_gqa_testdev_balanced/{MODEL}/merge.jsonl",
    "annotations": FIXTURES / "gqa/data/testdev_balanced_questions.json",
}
SCIENCEQA = {
    "answers": FIXTURES / f"scienceqa/answers/{MODEL}.jsonl",
    "problems": FIXTURES / "scienceqa/problems.json",
    "pid_splits": FIXTURES / "scienceqa/pid_splits.json",
}
MME = {
    "answers": FIXTURES / f"MME/answers/{MODEL}.jsonl",
    "annotations": FIXTURES / "MME/MME_Benchmark_release_version",
}
MMBENCH = {
    "answers": FIXTURES / f"mmbench/answers/mmbench_dev_20230712/{MODEL}.jsonl",
    "annotations": FIXTURES / "mmbench/mmbench_dev_20230712.tsv",
}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def copy_fixture(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="tokenpacker-eval")
    add_score_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code = args.func(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# POPE


def test_pope_reads_the_first_sentence_and_only_exact_no_words():
    assert not says_no("Yes, there is a dog.")
    assert says_no("No, there is not.")
    assert says_no("There is no car. Yes.")  # "no" is a word of the first sentence
    assert not says_no("Not sure.")  # "Not" is not one of "No", "no", "not"
    assert not says_no("NO")
    assert not says_no("I see a cat. No, wait.")  # only the first sentence counts
    assert says_no("not.")
    assert not says_no("Nothing")
    assert not says_no("no\n")  # words are split at spaces only


def test_pope_scores_each_category_like_the_original():
    results = score_pope(**POPE)
    # adversarial, labels yes no yes no: "Yes, there is..." TP; "Not sure." FP; "No" FN; "There is no car. Yes." TN
    assert results["categories"]["adversarial"] == {
        "questions": 4, "tp": 1, "fp": 1, "tn": 1, "fn": 1,
        "accuracy": 50.0, "precision": 50.0, "recall": 50.0, "f1": 50.0, "yes_ratio": 50.0,
    }  # fmt: skip
    # popular, labels yes yes no no: "Yes" TP; "yes." TP; "No, there is not." TN; "NO" FP (not an exact "No")
    # precision 2/3, recall 2/2, F1 = 2 * 2/3 * 1 / (2/3 + 1) = 0.8, yes-ratio 3/4
    popular = results["categories"]["popular"]
    assert (popular["tp"], popular["fp"], popular["tn"], popular["fn"]) == (2, 1, 1, 0)
    assert popular["accuracy"] == 75.0 and popular["recall"] == 100.0 and popular["yes_ratio"] == 75.0
    assert popular["precision"] == pytest.approx(200 / 3) and popular["f1"] == pytest.approx(80.0)
    # random: all four right, two yes
    random = results["categories"]["random"]
    assert (random["accuracy"], random["f1"], random["yes_ratio"]) == (100.0, 100.0, 50.0)
    # averages over the three categories: (50 + 75 + 100) / 3, (50 + 66.67 + 100) / 3, (50 + 80 + 100) / 3
    assert results["average"]["accuracy"] == pytest.approx(75.0)
    assert results["average"]["precision"] == pytest.approx((50 + 200 / 3 + 100) / 3)
    assert results["average"]["f1"] == pytest.approx(230 / 3)
    assert results["average"]["yes_ratio"] == pytest.approx(175 / 3)


def test_pope_pairs_answers_in_question_order_whatever_the_answers_order(tmp_path):
    shuffled = write_jsonl(tmp_path / "answers.jsonl", read_jsonl(POPE["answers"])[::-1])
    assert score_pope(shuffled, POPE["questions"], POPE["annotation_dir"]) == score_pope(**POPE)


def test_pope_refuses_label_files_that_do_not_match_the_questions(tmp_path):
    folder = copy_fixture("pope", tmp_path)
    labels = folder / "coco/coco_pope_random.json"
    labels.write_text("".join(labels.read_text().splitlines(keepends=True)[:3]))
    with pytest.raises(ValueError, match=r"coco_pope_random.json holds 3 labels but .* has 4 questions of category"):
        score_pope(POPE["answers"], POPE["questions"], folder / "coco")
    labels.write_text('{"question_id": 1, "label": "maybe"}\n' * 4)
    with pytest.raises(ValueError, match=r"coco_pope_random.json record 1: label 'maybe', expected yes/no"):
        score_pope(POPE["answers"], POPE["questions"], folder / "coco")


# The VQA answer normalization and accuracy (TextVQA, VQAv2, VizWiz)


@pytest.mark.parametrize(
    "answer, normalized",
    [
        ("The Dog's bone.", "dog 's bone"),  # lower case, "'s" split off, final period and article dropped
        ("3.5 dollars", "3.5 dollars"),  # a period before a digit stays
        ("a, b", "b"),  # commas go first, then the article
        ("left- right", "left right"),  # a mark touching a space is removed everywhere...
        ("x-ray", "x ray"),  # ...otherwise it becomes a space
        ("(yes) - no", "yes no"),  # "-" touches a space: removed; "(" and ")" do not: spaces
        ("Isnt it ten?", "isn't it 10"),
        ("None", "0"),
        ("dont walk", "don't walk"),
        ("somebody'd", "somebodyd"),  # the table's own quirk
        ("Im here", "im here"),  # capitalized entries of the table are never reached
        ("x" + "." * 40, "x" + "." * 8),  # only the first 32 periods are removed
        ("two\tcats\n", "2 cats"),
    ],
)
def test_answers_are_normalized_like_evalai(answer, normalized):
    assert normalize_answer(answer) == normalized


def test_vqa_accuracy_averages_over_the_ten_leave_one_out_subsets():
    # 3 of 10 humans agree: the 3 see 2 others (2/3), the 7 see 3 (1): (3 * 2/3 + 7) / 10 = 0.9
    assert vqa_accuracy("Dont walk", ["don't walk"] * 2 + ["dont walk"] + ["walk"] * 7) == pytest.approx(0.9)
    # 1 of 10: the 1 sees none, the 9 see one: 9 * (1/3) / 10 = 0.3
    assert vqa_accuracy("red", ["red"] + ["blue"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("Yes!", ["yes"] * 4 + ["no"] * 6) == 1.0
    assert vqa_accuracy("maybe", ["yes"] * 10) == 0.0


# TextVQA


def test_textvqa_reads_the_question_back_from_each_prompt_form():
    instruction = "\nAnswer the question using a single word or phrase."
    assert question_of_prompt("What is it?\nReference OCR token: a, b" + instruction) == "what is it?"
    assert question_of_prompt("Reference OCR token: a, b\nWhat is it?" + instruction) == "what is it?"
    assert question_of_prompt("OCR tokens: a Question: What is it? Short answer:") == "what is it?"
    assert question_of_prompt("What is it?" + instruction) == "what is it?"
    assert question_of_prompt("What is it?") is None


def test_textvqa_scores_like_m4c():
    # "Dakota." vs 7 x dakota: 1; "Dont walk": 0.9 (3 agree after "dont" -> "don't");
    # "The two" -> "2" vs ["2", "two", 8 x "3"]: 2 agree: (2 * 1/3 + 8 * 2/3) / 10 = 0.6;
    # "Coca Cola!" vs 3 x "coca-cola" (-> "coca cola"): 0.9; "nothing": 0. Mean 3.4 / 5 = 68 %
    assert score_textvqa(**TEXTVQA) == {"benchmark": "textvqa", "questions": 5, "accuracy": pytest.approx(68.0)}


# VQAv2 and VizWiz


def test_vqav2_submission_fills_every_split_question_and_scores_annotated_ones(tmp_path):
    results = score_vqav2(**VQAV2, output=tmp_path / "upload/tokenpacker-7b.json")
    # "Yes" vs 10 x yes: 1; "Two" -> "2" vs 2 x "2": 0.6; "red" vs 1 x red: 0.3. (1 + 0.6 + 0.3) / 3
    assert results["accuracy"] == pytest.approx(190 / 3)
    assert (results["questions"], results["answered"]) == (4, 3)
    assert json.loads((tmp_path / "upload/tokenpacker-7b.json").read_text()) == [
        {"question_id": 262144000, "answer": "yes"},
        {"question_id": 262144001, "answer": "2"},
        {"question_id": 262144002, "answer": "red"},
        {"question_id": 262144003, "answer": ""},  # in the test split, not in test-dev: not answered
    ]


def test_vizwiz_submission_normalizes_unanswerable_and_scores(tmp_path):
    results = score_vizwiz(**VIZWIZ, output=tmp_path / "vizwiz.json")
    # "Unanswerable" vs 10 x unanswerable: 1; "Coca Cola" vs 2 agree: 0.6; "A dog." -> "dog", 4 agree: 1
    assert results["accuracy"] == pytest.approx(260 / 3) and results["unanswerable"] == pytest.approx(100 / 3)
    assert json.loads((tmp_path / "vizwiz.json").read_text()) == [
        {"image": "VizWiz_val_00000000.jpg", "answer": "unanswerable"},
        {"image": "VizWiz_val_00000001.jpg", "answer": "coca cola"},
        {"image": "VizWiz_val_00000002.jpg", "answer": "dog"},
    ]


def test_vizwiz_needs_an_answer_for_every_question(tmp_path):
    answers = write_jsonl(tmp_path / "answers.jsonl", read_jsonl(VIZWIZ["answers"])[:2])
    with pytest.raises(ValueError, match=r"has no answer for 1 question\(s\) of .*llava_test.jsonl, e.g. 2"):
        score_vizwiz(answers, VIZWIZ["questions"], tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()


# GQA


def test_gqa_exact_match_over_balanced_questions_and_the_predictions_file(tmp_path):
    results = score_gqa(**GQA, output=tmp_path / "testdev_balanced_predictions.json")
    # balanced: "Yes." -> yes (verify, right); "White" (query, right); "The plate." -> "the plate" != "plate"
    # (query, wrong); "No" (logical, right). The unbalanced fifth question is not scored.
    assert (results["questions"], results["accuracy"], results["binary"], results["open"]) == (4, 75.0, 100.0, 50.0)
    assert results["structural_types"]["query"] == {"questions": 2, "accuracy": 50.0}
    assert results["semantic_types"] == {
        "attr": {"questions": 1, "accuracy": 100.0},
        "obj": {"questions": 2, "accuracy": 50.0},
        "rel": {"questions": 1, "accuracy": 100.0},
    }
    predictions = json.loads((tmp_path / "testdev_balanced_predictions.json").read_text())
    assert predictions[2] == {"questionId": "202225914", "prediction": "the plate"} and len(predictions) == 5


def test_gqa_questions_without_answers_are_named(tmp_path):
    questions = json.loads(GQA["annotations"].read_text())
    del questions["201640614"]["answer"]
    path = tmp_path / "test_balanced_questions.json"
    path.write_text(json.dumps(questions))
    with pytest.raises(ValueError, match=r"question '201640614' has no answer: the test split has none"):
        score_gqa(GQA["answers"], path)


# ScienceQA


def test_scienceqa_reads_letters_like_the_original():
    assert parse_letter("B") == "B"
    assert parse_letter("A. dog") == "A"
    assert parse_letter("The answer is C.") == "C"
    assert parse_letter("The answer is C") is None  # the pattern wants one more character after the letter
    assert parse_letter("The answer is A. The answer is B.") is None  # two answers
    assert parse_letter("I think it is B") is None
    assert parse_letter("A.dog") is None
    assert parse_letter("") is None


def test_scienceqa_accuracy_and_image_accuracy():
    results = score_scienceqa(**SCIENCEQA)
    # test split 4..10: "B" right; "A. dog" right (image); "The answer is C." right (image); "I think it is B"
    # wrong (image); two "The answer is" wrong; 9 unanswered, wrong; "D" of two choices wrong. 3 / 7; image 2 / 3
    assert results == {
        "benchmark": "scienceqa", "split": "test", "questions": 7, "unanswered": 1, "correct": 3,
        "accuracy": pytest.approx(300 / 7), "image_questions": 3, "image_accuracy": pytest.approx(200 / 3),
    }  # fmt: skip


# MME


def test_mme_reads_yes_and_no_within_the_first_four_characters():
    assert read_yes_no("Yes") == "yes" and read_yes_no("No, there is not.") == "no"
    assert read_yes_no("Not sure") == "no"  # "not " holds "no" (POPE reads the same answer as yes)
    assert read_yes_no("I don't know") == "other"
    assert read_yes_no("The answer is yes") == "other"


def test_mme_scores_accuracy_and_accuracy_plus_per_category():
    results = score_mme(**MME)
    perception = results["perception"]
    # existence: 4 of 4 right, both images fully right: 100 + 100
    assert perception["categories"]["existence"]["score"] == 200.0
    # count: image 1 "Yes"/"Yes" (truth yes/no, the second prompt matched with MME's two spaces), image 2
    # "I don't know" (other)/"no": 2 of 4 right, no image fully right: 50 + 0
    assert perception["categories"]["count"] == {
        "images": 2, "questions": 4, "unparsed": 1, "accuracy": 50.0, "accuracy_plus": 0.0, "score": 50.0,
    }  # fmt: skip
    # artwork (questions_answers_YN/ layout): yes/yes against yes/no: 50 + 0. Perception 200 + 50 + 50
    assert perception["categories"]["artwork"]["score"] == 50.0 and perception["score"] == 300.0
    assert perception["missing"] == ["position", "color", "posters", "celebrity", "scene", "landmark", "OCR"]
    assert results["cognition"]["score"] == 200.0 and list(results["cognition"]["categories"]) == ["code_reasoning"]


def test_mme_needs_both_questions_of_an_image(tmp_path):
    answers = write_jsonl(tmp_path / "answers.jsonl", read_jsonl(MME["answers"])[1:])
    with pytest.raises(ValueError, match=r"answers 1 question\(s\) of existence/000000006040.jpg: MME asks 2"):
        score_mme(answers, MME["annotations"])


# MMBench


def test_mmbench_reads_the_letter_by_mmbench_rules():
    options = ["cat", "dog", "bird"]
    assert infer_letter("B", options) == "B"
    assert infer_letter("(C) bird", options) == "C"
    assert infer_letter("The answer is B.", options) == "B"
    assert infer_letter("A or B", options) is None  # two letters, and no option's text
    assert infer_letter("A dog is on the mat", options) == "B"  # "A" is likely the article: read by the text
    assert infer_letter("a dog", options) == "B"
    assert infer_letter("D", options) is None  # no fourth option


def test_mmbench_circular_accuracy_and_submission(tmp_path):
    results = score_mmbench(**MMBENCH, output=tmp_path / "upload.xlsx")
    # question 0 and its copy 1000000: "A" and "The answer is D." both right; question 1: "B" right but its copy
    # 1000001 "B" wrong (answer A); question 2: "3" names option C by its text, right. Circular 2 / 3, answers 4 / 5
    assert (results["questions"], results["accuracy"]) == (3, pytest.approx(200 / 3))
    assert results["single_answer_accuracy"] == 80.0
    assert results["categories"] == {
        "attribute_recognition": {"questions": 2, "accuracy": 100.0},
        "image_topic": {"questions": 1, "accuracy": 0.0},
    }
    from openpyxl import load_workbook

    table = [list(row) for row in load_workbook(tmp_path / "upload.xlsx").active.iter_rows(values_only=True)]
    assert table[0] == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    assert table[3] == [1, "Which animal is shown?", "cat", "dog", None, None, "B", "B", "dev"]
    assert [row[6] for row in table[1:]] == ["A", "The answer is D.", "B", "B", "3"]
    score_mmbench(**MMBENCH, output=tmp_path / "upload.tsv")
    lines = (tmp_path / "upload.tsv").read_text().splitlines()
    assert lines[0].split("\t") == table[0]
    assert lines[3].split("\t") == ["1", "Which animal is shown?", "cat", "dog", "", "", "B", "B", "dev"]


def test_mmbench_rounds_of_rotated_options_count_in_the_circular_accuracy(tmp_path):
    records = read_jsonl(MMBENCH["answers"])
    question_2 = next(record for record in records if record["question_id"] == 2)
    # round 1 shows ["2", "3", "1"] lettered A, B, C; they are the TSV's B, C, A; the answer is C: letter "B"
    rotated = {**question_2, "round_id": 1, "options": ["2", "3", "1"], "option_char": ["B", "C", "A"]}
    right = write_jsonl(tmp_path / "right.jsonl", records + [{**rotated, "text": "B"}])
    wrong = write_jsonl(tmp_path / "wrong.jsonl", records + [{**rotated, "text": "C"}])
    assert score_mmbench(right, MMBENCH["annotations"])["accuracy"] == pytest.approx(200 / 3)
    assert score_mmbench(wrong, MMBENCH["annotations"])["accuracy"] == pytest.approx(100 / 3)


def test_mmbench_xlsx_without_openpyxl_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: None)
    with pytest.raises(ValueError, match=r"upload.xlsx needs openpyxl \(pip install 'tokenpacker\[eval\]'\); a .tsv"):
        score_mmbench(**MMBENCH, output=tmp_path / "upload.xlsx")
    assert list(tmp_path.iterdir()) == []


# The command line


CLI_CASES = {  # benchmark: (arguments besides --answers, the Python call, a line of the text output)
    "pope": (
        ["--questions", POPE["questions"], "--annotation-dir", POPE["annotation_dir"]],
        lambda out: score_pope(**POPE),
        "  popular              4   2   1   1   0     75.00      66.67  100.00   80.00      75.00",
    ),
    "textvqa": (["--annotations", TEXTVQA["annotations"]], lambda out: score_textvqa(**TEXTVQA), "accuracy: 68.00"),
    "vqav2": (
        ["--questions", VQAV2["questions"], "--annotations", VQAV2["annotations"], "--output", "{out}.json"],
        lambda out: score_vqav2(**VQAV2, output=f"{out}.json", force=True),
        "accuracy: 63.33",
    ),
    "vizwiz": (
        ["--questions", VIZWIZ["questions"], "--output", "{out}.json"],
        lambda out: score_vizwiz(VIZWIZ["answers"], VIZWIZ["questions"], f"{out}.json", force=True),
        "unanswerable: 33.33",
    ),
    "gqa": (
        ["--annotations", GQA["annotations"], "--output", "{out}.json"],
        lambda out: score_gqa(**GQA, output=f"{out}.json", force=True),
        "  query            2     50.00",
    ),
    "scienceqa": (
        ["--annotations", SCIENCEQA["problems"], "--pid-splits", SCIENCEQA["pid_splits"]],
        lambda out: score_scienceqa(**SCIENCEQA),
        "image_accuracy: 66.67",
    ),
    "mme": (
        ["--annotations", MME["annotations"]],
        lambda out: score_mme(**MME),
        "    count           2          4         1     50.00           0.00   50.00",
    ),
    "mmbench": (
        ["--annotations", MMBENCH["annotations"], "--output", "{out}.tsv"],
        lambda out: score_mmbench(**MMBENCH, output=f"{out}.tsv", force=True),
        "  image_topic                    1      0.00",
    ),
}
ANSWERS = {"pope": POPE, "textvqa": TEXTVQA, "vqav2": VQAV2, "vizwiz": VIZWIZ, "gqa": GQA, "scienceqa": SCIENCEQA,
           "mme": MME, "mmbench": MMBENCH}  # fmt: skip


def cli_arguments(benchmark: str, out: Path) -> list[str]:
    arguments = CLI_CASES[benchmark][0]
    return ["score", benchmark, "--answers", str(ANSWERS[benchmark]["answers"])] + [
        str(argument).format(out=out) for argument in arguments
    ]


@pytest.mark.parametrize("benchmark", list(CLI_CASES))
def test_the_command_prints_the_results_of_the_python_function_as_json_and_as_text(benchmark, tmp_path, capsys):
    _, score, line = CLI_CASES[benchmark]
    code, out, err = run_cli(cli_arguments(benchmark, tmp_path / "json") + ["--json"], capsys)
    assert (code, err) == (0, "") and json.loads(out) == score(tmp_path / "json")
    code, out, err = run_cli(cli_arguments(benchmark, tmp_path / "text"), capsys)
    assert (code, err) == (0, "") and out.startswith(f"benchmark: {benchmark}\n")
    assert line in out.splitlines()


# Bad input: one error line naming the file and the problem, exit code 1, nothing written


def cli_error(argv: list[str], capsys) -> str:
    code, out, err = run_cli(argv, capsys)
    assert code == 1 and out == "" and err.count("\n") == 1, (code, out, err)
    return err


def test_a_missing_file_is_named(tmp_path, capsys):
    err = cli_error(["score", "textvqa", "--answers", str(tmp_path / "absent.jsonl"), "--annotations",
                     str(TEXTVQA["annotations"])], capsys)  # fmt: skip
    assert err == f"tokenpacker-eval score textvqa: error: answers file {tmp_path / 'absent.jsonl'} does not exist\n"
    err = cli_error(["score", "mme", "--answers", str(MME["answers"]), "--annotations", str(tmp_path / "MME")], capsys)
    assert err == f"tokenpacker-eval score mme: error: MME folder {tmp_path / 'MME'} does not exist\n"


def test_answers_of_unknown_questions_are_named(tmp_path, capsys):
    records = read_jsonl(POPE["answers"])
    answers = write_jsonl(tmp_path / "answers.jsonl", records + [{**records[0], "question_id": 999}])
    err = cli_error(["score", "pope", "--answers", str(answers), "--questions", str(POPE["questions"]),
                     "--annotation-dir", str(POPE["annotation_dir"])], capsys)  # fmt: skip
    assert f"answers file {answers} answers 1 question(s) that {POPE['questions']} does not hold, e.g. 999" in err


def test_unanswered_questions_are_named(tmp_path):
    answers = write_jsonl(tmp_path / "answers.jsonl", read_jsonl(POPE["answers"])[1:])
    with pytest.raises(ValueError, match=r"has no answer for 1 question\(s\) of .* \(category adversarial\), e.g. 1"):
        score_pope(answers, POPE["questions"], POPE["annotation_dir"])


def test_annotations_without_answers_are_named(tmp_path):
    document = json.loads(TEXTVQA["annotations"].read_text())
    del document["data"][1]["answers"]
    path = tmp_path / "TextVQA_0.5.1_test.json"
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match=r"data\[1\] \(question 'what does the sign say\?'\) has no answer strings"):
        score_textvqa(TEXTVQA["answers"], path)


def test_files_in_the_wrong_format_are_named_with_the_line(tmp_path):
    lines = TEXTVQA["answers"].read_text().splitlines()
    broken = tmp_path / "answers.jsonl"
    broken.write_text("\n".join([lines[0], "{not json"]) + "\n")
    with pytest.raises(ValueError, match=rf"answers file {broken} line 2 is not JSON"):
        score_textvqa(broken, TEXTVQA["annotations"])
    write_jsonl(broken, [{"question_id": "003a8ae2ef43b901", "prompt": "q\ni"}])
    with pytest.raises(ValueError, match=rf"answers file {broken} line 1 has no 'text' field"):
        score_textvqa(broken, TEXTVQA["annotations"])
    write_jsonl(broken, [{"question_id": "003a8ae2ef43b901", "prompt": "q\ni", "text": None}])
    with pytest.raises(ValueError, match=r"line 1: 'text' is None, expected str"):
        score_textvqa(broken, TEXTVQA["annotations"])
    with pytest.raises(ValueError, match=r"holds a JSON list, expected a JSON dict"):
        score_textvqa(TEXTVQA["answers"], VIZWIZ["annotations"])
    with pytest.raises(ValueError, match=r"answers file .* answers question 1 more than once"):
        score_pope(write_jsonl(broken, read_jsonl(POPE["answers"]) * 2), POPE["questions"], POPE["annotation_dir"])


def test_outputs_are_never_written_over_inputs_or_existing_files_unless_forced(tmp_path):
    folder = copy_fixture("vqav2", tmp_path)
    questions = folder / "llava_vqav2_mscoco_test2015.jsonl"
    before = questions.read_bytes()
    with pytest.raises(ValueError, match=r"the output .*llava_vqav2_mscoco_test2015.jsonl is an input of this command"):
        score_vqav2(VQAV2["answers"], questions, questions, force=True)
    assert questions.read_bytes() == before
    output = tmp_path / "upload.json"
    output.write_text("previous")
    with pytest.raises(FileExistsError, match=r"the output .*upload.json exists: pass --force \(force=True\)"):
        score_vqav2(VQAV2["answers"], questions, output)
    assert output.read_text() == "previous"
    score_vqav2(VQAV2["answers"], questions, output, force=True)
    assert len(json.loads(output.read_text())) == 4
    assert sorted(path.name for path in tmp_path.iterdir()) == ["upload.json", "vqav2"]  # no temporary file left
