"""Writing an output folder atomically: built in a staging folder beside the target, moved into place when complete.

A killed run leaves its staging folder behind with a marker (its process id); the next run writing the same target
removes it. An output that is, holds or lies inside one of the run's inputs is refused before anything is written.
Used by the conversion, `tokenpacker.shapes ship` and the demo. Imports nothing of the package.
"""

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)


def check_output_is_safe(output: Path, sources: dict[str, Path], written: str = "the converted checkpoint") -> None:
    """Refuses an output folder that is, holds or lies inside a source folder, or that is or holds the current
    directory or the home folder: replacing it would delete them. Paths are compared resolved (links, `..`).
    `written` says what the folder is for, in the message."""
    target = Path(output).resolve()
    protected = [(what, folder, True) for what, folder in sources.items()]
    protected += [("the current directory", Path.cwd(), False), ("the home folder", Path.home(), False)]
    for what, folder, inside_forbidden in protected:
        folder = Path(folder).resolve()
        if target == folder:
            relation = "is"
        elif target in folder.parents:
            relation = "contains"
        elif inside_forbidden and folder in target.parents:
            relation = "lies inside"
        else:
            continue
        raise ValueError(
            f"The output folder {output} {relation} {what} ({folder}): writing there could delete it; choose a new "
            f"folder for {written}"
        )


STAGING_MARKER = ".tokenpacker-staging"  # in a staging folder: {"pid": ..., "created_parents": [...]}


def staging_prefix(target: Path, activity: str) -> str:
    return f".{target.name}.{activity}-"


def process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_empty_folders(folders: list[Path]):
    """Removes each folder that is empty, deepest first."""
    for folder in sorted(folders, key=lambda path: len(path.parts), reverse=True):
        try:
            folder.rmdir()
        except OSError:
            pass


def remove_stale_staging(target: Path, activity: str):
    """Removes the staging folders that earlier runs writing `target` left when killed: those beside it that carry
    our marker with the id of a process that is gone, and the parent folders those runs created, if empty."""
    if not target.parent.is_dir():
        return
    for folder in target.parent.glob(staging_prefix(target, activity) + "*"):
        try:
            marker = json.loads((folder / STAGING_MARKER).read_text())
            pid, created = int(marker["pid"]), [Path(path) for path in marker["created_parents"]]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not ours, or still being set up
        if not process_is_alive(pid):
            logger.info("Removing %s, left by an interrupted run (process %d)", folder, pid)
            shutil.rmtree(folder, ignore_errors=True)
            remove_empty_folders(created)


class OutputFolder:
    """A temporary folder beside `target` (named `.{target}.{activity}-*`) that replaces it only on `commit()`;
    `discard()` removes every trace, including parent folders it had to create. The folder carries a marker (process
    id, created parents) so that a later run writing the same target removes it if this process is killed before it
    can clean up. As a context manager it discards the folder when the block raises; the block commits."""

    def __init__(self, target: str | Path, activity: str):
        self.target = target = Path(target)
        remove_stale_staging(target, activity)
        self.created_parents = [parent for parent in target.parents if not parent.exists()]
        target.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=staging_prefix(target, activity), dir=target.parent))
        marker = {"pid": os.getpid(), "created_parents": [str(parent.absolute()) for parent in self.created_parents]}
        (self.path / STAGING_MARKER).write_text(json.dumps(marker))

    def commit(self):
        (self.path / STAGING_MARKER).unlink()
        umask = os.umask(0)
        os.umask(umask)
        self.path.chmod(0o777 & ~umask)  # mkdtemp and some writers create owner-only entries
        for file in self.path.iterdir():
            file.chmod(0o666 & ~umask)
        if self.target.exists() or self.target.is_symlink():
            previous = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.replaced-", dir=self.target.parent))
            self.target.rename(previous / self.target.name)
            self.path.rename(self.target)
            shutil.rmtree(previous)
        else:
            self.path.rename(self.target)

    def discard(self):
        shutil.rmtree(self.path, ignore_errors=True)
        remove_empty_folders(self.created_parents)

    def __enter__(self) -> "OutputFolder":
        return self

    def __exit__(self, error_type, error, traceback):
        if error_type is not None:
            self.discard()


__all__ = ["OutputFolder", "check_output_is_safe", "remove_stale_staging"]
