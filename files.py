"""The project's files: written whole or not at all, read without running code; and UserError, the one-line error
that every script ends with when the command line, the data or the disk is wrong."""
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch


class UserError(Exception):
    """A mistake in the command line or the data: printed as one line, without a traceback."""


class WriteError(UserError):
    """A write that failed (a full disk, a quota, a read-only folder), as one line: the folder, the space needed
    (when known) and the space free."""

    def __init__(self, error: OSError, folder: Path, needed: int | None = None):
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        free = shutil.disk_usage(existing).free
        need = f"it needs about {needed / 1e6:.1f} MB there and " if needed else ""
        super().__init__(f"could not write to {folder} ({error.strerror or error}): {need}{free / 1e6:.1f} MB are "
                         f"free; what was written before is intact")


def atomic_write(path: str | Path, write, needed: int | None = None) -> None:
    """Write a file so that it is either the old or the complete new one, even if killed midway.

    `write(f)` writes to a temporary file in the same folder; it is flushed, fsynced and renamed. A failed write
    raises WriteError (`needed`: the bytes it takes, for its message), and leaves the old file as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise WriteError(e, path.parent, needed) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the permissions of a plainly created file, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        cause = os_error(e)
        if cause is None:
            raise
        raise WriteError(cause, path.parent, needed) from None


def os_error(e: BaseException) -> OSError | None:
    """The OSError behind a failure: itself, or the one another library's error wraps. torch.save's zip writer
    reports a full disk as a RuntimeError ("unexpected pos") raised while handling the OSError."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def first_line(e: BaseException) -> str:
    """An exception's first line, or its type when it has no message."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def writable_folder(folder: str | Path, fix: str = "give another place") -> Path:
    """Create `folder` and its parents, and check that a file can be written there: before the work, not after."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"cannot write to '{folder}' ({e.strerror}): {fix}")
    return folder


def tensor_bytes(obj) -> int:
    """The bytes of every tensor in a (nested) state dict: about what torch.save writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_checkpoint(obj, path: str | Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f), needed=tensor_bytes(obj))


def save_json(obj, path: str | Path) -> None:
    text = (json.dumps(obj, indent=2) + "\n").encode()
    atomic_write(path, lambda f: f.write(text), needed=len(text))


class Pickled:
    """Stands in for every class a checkpoint names (a model saved whole, `torch.save(model)`): it keeps the state
    unpickling hands it and runs nothing, so the weights can be read without executing code from the file."""

    def __init__(self, *args, **kwargs):
        self.state = None

    def __setstate__(self, state):
        self.state = state


def load_checkpoint(path: str | Path, map_location="cpu", objects: bool = False):
    """torch.load with weights_only=True: a checkpoint can hold tensors and plain data, never code. With `objects`,
    the classes a file names (a pickled model) are read as inert `Pickled` stand-ins, their code never run."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"'{path}' {'is a folder, not a checkpoint file' if path.is_dir() else 'does not exist'}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        error = e
    if not zipfile.is_zipfile(path):
        raise UserError(f"'{path}' is not a checkpoint in torch.save's format (a zip archive)")
    # A file that names classes or functions: torch's advice, to load it unsafely, is never the way here.
    names = []
    if "weights only" in str(error).lower():
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    if not names:
        raise UserError(f"'{path}' is not a readable checkpoint ({first_line(error)})")
    if not objects:
        raise UserError(f"'{path}' is not a readable checkpoint: it holds Python objects ({', '.join(names[:3])}), "
                        f"not only tensors, and this project reads weights only")
    stand_ins = [(type(name.rsplit(".", 1)[-1], (Pickled,), {}), name) for name in names]
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception:
        raise UserError(f"'{path}' is not a readable checkpoint: it holds Python objects ({', '.join(names[:3])}) "
                        f"that cannot be read without running their code; save the model's state_dict() instead")
