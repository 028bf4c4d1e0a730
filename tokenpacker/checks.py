"""What a checkpoint folder or Hub repository holds, read from its config.json alone, before any weights load.

`AutoModelForImageTextToText.from_pretrained` on an original TokenPacker release (a LLaVA folder) does not fail: its
config.json has `model_type` "llava", so transformers builds its own Llava with default 7B text settings, whatever
the folder holds. `check_folder` tells the kinds apart first:

    python -m tokenpacker.checks path/to/folder
"""

import json
import sys
from pathlib import Path

from transformers.utils import CONFIG_NAME, cached_file

CONVERT_HINT = "convert it with `tokenpacker-convert --checkpoint <folder> --output <new folder>`"


def check_folder(path: str | Path) -> dict:
    """Returns the config.json of a TokenPacker checkpoint (a local folder or a Hub repo id).

    Raises ValueError naming what the folder is when it is not one: an original TokenPacker LLaVA release, another
    LLaVA release, or another model type.
    """
    config_file = cached_file(str(path), CONFIG_NAME, _raise_exceptions_for_missing_entries=False)
    if config_file is None:
        raise ValueError(f"{path} has no {CONFIG_NAME}: it is not a model checkpoint")
    config = json.loads(Path(config_file).read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{path}: {CONFIG_NAME} must hold a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type == "tokenpacker":
        return config
    if "mm_projector_type" in config or "mm_vision_tower" in config:
        projector = config.get("mm_projector_type")
        if projector == "tokenpacker":
            raise ValueError(f"{path}: this is an original TokenPacker LLaVA checkpoint: {CONVERT_HINT}")
        raise ValueError(
            f"{path}: this is an original LLaVA checkpoint with mm_projector_type {projector!r}, not TokenPacker"
        )
    raise ValueError(f"{path}: this is a {model_type!r} checkpoint, not TokenPacker (model_type 'tokenpacker')")


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    if len(arguments) != 1:
        print("usage: python -m tokenpacker.checks FOLDER_OR_REPO_ID", file=sys.stderr)
        return 2
    try:
        config = check_folder(arguments[0])
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    mode = config.get("image_aspect_ratio", "pad")
    print(f"{arguments[0]}: a TokenPacker checkpoint ('{mode}' images, scale factor {config.get('scale_factor', 2)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
