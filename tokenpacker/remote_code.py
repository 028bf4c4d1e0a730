"""Remote-code export: the package's model code written beside a saved folder, so that it loads with
`trust_remote_code=True` where tokenpacker is not installed.

`save_pretrained` writes weights and settings only; `export_remote_code(folder)` is the one step that adds the flat
code files and the `auto_map` entries naming them. The Hub folders of `tokenpacker-convert` and `tokenpacker-train`
are exported; a folder saved by hand is exported by calling it after `save_pretrained`.
"""

import importlib
import json
import os
import re
from pathlib import Path

# The modules a Hub folder carries; the modules they import relatively come with them.
EXPORTED_MODULES = (
    "tokenpacker.configuration.configuration_tokenpacker",
    "tokenpacker.modeling.modeling_tokenpacker",
    "tokenpacker.processing.image_processing_tokenpacker",
    "tokenpacker.processing.processing_tokenpacker",
)
_PROCESSOR_CLASSES = {
    "AutoProcessor": "processing_tokenpacker.TokenPackerProcessor",
    "AutoImageProcessor": "image_processing_tokenpacker.TokenPackerImageProcessor",
}
# JSON file (or "file/section") -> the Auto classes it names; files the folder does not hold are left alone.
AUTO_MAP = {
    "config.json": {
        "AutoConfig": "configuration_tokenpacker.TokenPackerConfig",
        "AutoModel": "modeling_tokenpacker.TokenPackerModel",
        "AutoModelForImageTextToText": "modeling_tokenpacker.TokenPackerForConditionalGeneration",
    },
    "processor_config.json": _PROCESSOR_CLASSES,
    "processor_config.json/image_processor": _PROCESSOR_CLASSES,
    "preprocessor_config.json": _PROCESSOR_CLASSES,
    "tokenizer_config.json": {"AutoProcessor": _PROCESSOR_CLASSES["AutoProcessor"]},
}
# `from ..package.module import` or `from .module import` at the start of a line
_RELATIVE_IMPORT = re.compile(r"^from (\.+)([\w.]*) import ", re.MULTILINE)


def flat_sources(module_names) -> dict[str, str]:
    """File name -> source of `module_names` and of every module they import relatively, importing each other flat.

    In this package the modules live in sibling subpackages (`from ..configuration.configuration_tokenpacker import`);
    in a Hub folder they sit side by side (`from .configuration_tokenpacker import`).
    """
    sources, pending = {}, list(module_names)
    while pending:
        module = importlib.import_module(pending.pop())
        path = Path(module.__file__)
        if path.name in sources:
            continue

        def flatten(match, package=module.__package__):
            target = importlib.util.resolve_name(match.group(1) + match.group(2), package)
            pending.append(target)
            return f"from .{target.rsplit('.', 1)[-1]} import "

        sources[path.name] = _RELATIVE_IMPORT.sub(flatten, path.read_text(encoding="utf-8"))
    return sources


def export_remote_code(folder: str | os.PathLike) -> list[str]:
    """Writes the flat code of the TokenPacker config, model, image processor and processor into `folder`, and adds
    `auto_map` entries to whichever of its config.json, processor_config.json, preprocessor_config.json and
    tokenizer_config.json it holds. Returns the names of the files written or updated."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"folder must be a saved TokenPacker folder, got {str(folder)!r}, which is not a directory")
    settings_files = sorted({location.partition("/")[0] for location in AUTO_MAP} & {p.name for p in folder.iterdir()})
    if not settings_files:
        raise ValueError(
            f"{folder} holds none of {', '.join(sorted({location.partition('/')[0] for location in AUTO_MAP}))}: "
            "save the model or processor there with save_pretrained first"
        )
    written = []
    for file_name, source in flat_sources(EXPORTED_MODULES).items():
        (folder / file_name).write_text(source, encoding="utf-8")
        written.append(file_name)
    for file_name in settings_files:
        path = folder / file_name
        content = json.loads(path.read_text(encoding="utf-8"))
        for location, entries in AUTO_MAP.items():
            name, _, section = location.partition("/")
            target = content.get(section) if section else content
            if name == file_name and isinstance(target, dict):
                target["auto_map"] = {**target.get("auto_map", {}), **entries}
        path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        written.append(file_name)
    return written


__all__ = ["export_remote_code"]
