"""`python -m tokenpacker.demo`: builds, saves, reloads and answers; a second run reuses the saved model."""

import re

import pytest
from PIL import Image

from tokenpacker import TokenPackerImageProcessor
from tokenpacker.demo import DEMO_IMAGE, default_folder, main


def run(capsys, *args):
    assert main(["--random", *args, "--max-new-tokens", "4"]) == 0
    return capsys.readouterr().out


def test_demo_builds_then_reuses_its_model(tmp_path, capsys):
    first = run(capsys, "--output", str(tmp_path / "demo"))
    assert f"saved it in {tmp_path / 'demo'}" in first
    assert re.search(r"^Answer: \S", first, re.MULTILINE)
    assert "Visual tokens: 144 for the image; LLaVA-1.5 uses 576 for one 336x336 crop" in first
    assert "The weights are random" in first
    second = run(capsys, "--output", str(tmp_path / "demo"))
    assert f"Reusing the demo model in {tmp_path / 'demo'}" in second
    answer = re.search(r"^Answer: .*$", first, re.MULTILINE).group()
    assert answer in second  # same weights, greedy decoding


def test_hd_demo_counts_the_crops_of_the_grid(tmp_path, capsys):
    out = run(capsys, "--hd", "--output", str(tmp_path / "hd"))
    with Image.open(DEMO_IMAGE) as image:
        grid = TokenPackerImageProcessor(image_aspect_ratio="slice")(image)["image_grids"][0].tolist()
    h_block, w_block = grid
    assert h_block * w_block > 1
    crops = h_block * w_block + 1  # the blocks and the thumbnail, 144 tokens each
    separators = h_block * (w_block - 1) + h_block + 1  # ',' inside rows, '\n' after each row and the thumbnail
    assert (
        f"Visual tokens: {crops * 144} for the image ({h_block}x{w_block} grid of crops + 1 thumbnail, 144 tokens per "
        f"crop, plus {separators} separator tokens)"
    ) in out


def test_the_cache_lives_in_the_users_cache_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_folder(hd=True).parent == tmp_path / "tokenpacker"
    assert default_folder(hd=True) != default_folder(hd=False)


def test_an_unrelated_output_folder_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        main(["--random", "--output", str(tmp_path)])
    assert f"--output {tmp_path} is neither empty nor a demo model folder" in capsys.readouterr().err


def test_the_default_demo_answers_a_held_out_scene_with_the_trained_model(capsys):
    from tokenpacker.shapes import QUESTION_KINDS, render_scene

    assert main(["--scene", "5", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    scene = render_scene("test", 5)
    width, height = scene.image.size
    assert width != height
    assert f"held-out tiny-shapes scene 5 ({width}x{height}): {scene.description}" in out
    for kind in QUESTION_KINDS:
        question, truth = scene.questions(kind)[0]
        assert f"Question: {question}\nAnswer: {truth} (true answer: {truth})" in out
    assert "Visual tokens: 36 for the image (each packs a 2x2 region of the 12x12 patch grid)" in out


def test_hd_and_output_go_with_the_random_model(capsys):
    with pytest.raises(SystemExit):
        main(["--hd"])
    assert "--hd and --output go with --random" in capsys.readouterr().err


def test_an_interrupted_build_leaves_nothing_and_the_next_run_builds_afresh(tmp_path, monkeypatch, capsys):
    from tokenpacker import demo

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "save_random_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(capsys, "--output", str(tmp_path / "new" / "demo"))
    assert list(tmp_path.iterdir()) == []  # no half-built model, no staging folder, no parent it created
    monkeypatch.undo()
    assert "Built a random-weight TokenPacker model" in run(capsys, "--output", str(tmp_path / "new" / "demo"))
