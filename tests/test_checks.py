"""`tokenpacker.checks`: what a folder holds, from its config.json, before any weights load."""

import json

import pytest

from tokenpacker.checks import check_folder, main

from .builders import tiny_checkpoint_folder
from .original_checkpoints import write_original_release


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("checks")
    release = write_original_release(root / "release", shards=1)
    (root / "converted").mkdir()
    converted = tiny_checkpoint_folder(root / "converted")
    return release, converted


def test_a_tokenpacker_folder_passes_and_returns_its_config(folders, capsys):
    _, converted = folders
    config = check_folder(converted)
    assert config == json.loads((converted / "config.json").read_text())
    assert main([str(converted)]) == 0
    assert capsys.readouterr().out == f"{converted}: a TokenPacker checkpoint ('pad' images, scale factor 2)\n"


def test_an_original_release_is_told_apart_and_pointed_to_the_converter(folders, capsys):
    release, _ = folders
    with pytest.raises(ValueError, match="this is an original TokenPacker LLaVA checkpoint: convert it with `tokenpacker-convert"):
        check_folder(release.checkpoint)
    assert main([str(release.checkpoint)]) == 1
    assert "original TokenPacker LLaVA checkpoint" in capsys.readouterr().err


def test_other_llava_releases_and_model_types_are_named(folders, tmp_path):
    release, _ = folders
    config = json.loads((release.checkpoint / "config.json").read_text())
    (tmp_path / "mlp").mkdir()
    (tmp_path / "mlp" / "config.json").write_text(json.dumps({**config, "mm_projector_type": "mlp2x_gelu"}))
    with pytest.raises(ValueError, match="original LLaVA checkpoint with mm_projector_type 'mlp2x_gelu', not TokenPacker"):
        check_folder(tmp_path / "mlp")
    with pytest.raises(ValueError, match="this is a 'clip' checkpoint, not TokenPacker"):
        check_folder(release.vision_tower)
    with pytest.raises(ValueError, match="has no config.json: it is not a model checkpoint"):
        check_folder(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json must hold a JSON object, got list"):
        check_folder(tmp_path)
