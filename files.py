"""The files the project writes: atomic writes, the marker that says a folder is ours, and logs read
so that a kill in the middle of a write costs one line, not the run.

Nothing here deletes or empties a folder that does not carry the project's marker (.badit.json,
written when the folder was made): a user's folder, a Hugging Face model, a folder of another kind
(a run is not a study) are refused with their path.
"""

import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from checks import InputError

MARKER = ".badit.json"
UMASK = os.umask(0o022)
os.umask(UMASK)


def atomic_write(path, write):
    """write(tmp) to a temporary file beside path, then rename it over path: readers see the old file or
    the new one, never a half-written one (the project's one way to write a file it may read back)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600; a file we write is as readable as any other
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    atomic_write(path, lambda f: Path(f).write_text(json.dumps(obj, indent=2)))


# ----------------------------------------------------------------------------------------------
# Folders the project made


def kind_of(folder) -> str | None:
    """The kind ("run", "study", "export", "prepared model", ...) of a folder the project made, or None."""
    try:
        return json.loads((Path(folder) / MARKER).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def mark(folder, kind: str, by: str):
    """Make `folder` (if need be) and record that `by` made it, as a folder of `kind`."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    write_json(Path(folder) / MARKER, {"kind": kind, "made_by": by})


def contents(folder) -> list[Path]:
    """The entries of a folder, the marker and a lock file aside."""
    return [p for p in Path(folder).iterdir() if p.name not in (MARKER, ".lock")] if Path(folder).is_dir() else []


def new_folder(folder, kind: str, by: str, flag: str):
    """The folder a command writes into: made and marked, or already ours (of this kind), or empty;
    a file, or a folder that holds something else, is refused before anything is written."""
    folder = Path(folder)
    check_writable_path(folder, flag)
    if contents(folder) and kind_of(folder) != kind:
        raise InputError(f"{flag} {folder} already holds files that {by} did not write"
                         + (f" (a {kind_of(folder)})" if kind_of(folder) else "")
                         + f"; choose another {flag}, or an empty folder.")
    mark(folder, kind, by)
    return folder


def check_writable_path(folder: Path, flag: str):
    """Refuse a folder path that is a file, or lies under one (mkdir would fail with NotADirectoryError)."""
    for p in [folder, *folder.parents]:
        if p.exists():
            if not p.is_dir():
                raise InputError(f"{flag} {folder}: {'it' if p == folder else p} is a file, not a folder; "
                                 f"choose another {flag}.")
            return


def empty_folder(folder, kind: str, flag: str):
    """Remove what a folder of ours holds (the marker and lock stay), refusing one without our marker of `kind`."""
    folder = Path(folder)
    if kind_of(folder) != kind:
        found = f"a {kind_of(folder)}, not a {kind}" if kind_of(folder) else f"no {MARKER} marker"
        raise InputError(f"{flag} {folder}: refusing to delete its contents: it holds {found}, so this project did "
                         f"not make it as a {kind}. Delete it yourself if it is expendable, or choose another {flag}.")
    for p in contents(folder):
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def lock_folder(folder, by: str, flag: str):
    """An exclusive lock on folder/.lock for the life of this process, so that a second `by` on the same
    folder is refused instead of interleaving two logs (POSIX; elsewhere no lock). -> keep the file object."""
    try:
        import fcntl
    except ImportError:
        return None
    f = open(Path(folder) / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "pid unknown"
        f.close()
        raise InputError(f"{folder} is in use by another {by} ({holder}): wait for it to finish or stop it, or choose "
                         f"another {flag}.") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {platform.node()}")
    f.flush()
    return f  # the lock lives as long as this file object


def inside(path, folder) -> bool:
    """Whether `path` is `folder` or lies under it (symbolic links resolved)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


# ----------------------------------------------------------------------------------------------
# Logs


def read_jsonl(file) -> list[dict]:
    """The records of a JSON-lines file we append to. A torn last line (a kill during its write) is dropped
    with a note; a damaged line before the last is an InputError that names it."""
    file = Path(file)
    if not file.is_file():
        return []
    lines = file.read_text(encoding="utf-8", errors="replace").split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if any(rest.strip() for rest in lines[i + 1:]):
                raise InputError(f"{file}: line {i + 1} is not valid JSON, and lines follow it: the log was edited "
                                 f"or damaged; restore it from a copy, or delete the line.") from None
            print(f"note: {file}: the last line is incomplete (the run was stopped while writing it); it is ignored.",
                  file=sys.stderr)
    return records


def read_json(file, fix="re-download the checkpoint or fix the file"):
    """A JSON file we or Hugging Face wrote; a damaged one is an InputError that names it and says `fix`."""
    try:
        return json.loads(Path(file).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{file}: not valid JSON ({e}); {fix}.") from None


def read_safetensors(file, fix="re-download the checkpoint", device="cpu") -> dict:
    """All tensors of a safetensors file we wrote; a truncated or damaged file, or a tensor that is not finite,
    is an InputError that names it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(file, device=str(device))
    except (SafetensorError, OSError) as e:
        raise InputError(f"{file}: cannot be read as safetensors ({e}): the file is incomplete or damaged; {fix}.") from None
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise InputError(f"{file}: tensor {bad[0]!r}{f' and {len(bad) - 1} more' if len(bad) > 1 else ''} holds NaN or "
                         f"infinite values; {fix}.")
    return tensors
