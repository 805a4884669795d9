"""The files the project writes, and the one rule every command that writes follows: it replaces or deletes
only what it can prove it wrote for this purpose.

    atomic_write / write_json       a file is replaced whole, never half-written
    new_folder / mark / empty_folder
                                    the .badit.json marker (command, kind, run), written only into a folder the
                                    command created and removed again if it wrote nothing there; only entries that
                                    kind of folder holds (WRITES) are replaced or deleted; no symbolic link inside
    check_apart                     a command's outputs lie outside its inputs, and hold none of them
    write_signed                    a single file (a comparison's table) replaced only if it is ours, unedited
    read_jsonl / read_record        logs and records read back, checked by schema where they are read: a torn last
                                    line is dropped, a record of the wrong shape is one error naming the file and field
    read_safetensors                tensors, never pickle; a damaged file or a NaN named
"""
import atexit
import fnmatch
import hashlib
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
# Folders the project made. The rule every command that writes follows: it replaces or deletes only what it can
# prove it wrote for this purpose. Proof is the marker (.badit.json: the command, the kind of output and, for a
# folder of files derived from a run, that run), written only into a folder the command created itself, and
# the entry's name being one that kind of folder holds (WRITES). A symbolic link inside is refused (a write
# through it would land outside the folder); outputs and inputs of one command must lie apart.

# What each kind of folder holds that its command wrote (fnmatch patterns; an atomic write's temporary file,
# <name>.XXXXXXXX, counts as its name's). A sub-folder carrying the marker is the project's too.
WRITES = {
    "run": ("config.json", "log.jsonl", "checkpoint", "checkpoint.new", "checkpoint.old", "adapter.safetensors",
            "adapter_config.json", "metrics_*", "continual.json", "after_*_*", "epoch_*", "base", "experts",
            "features.safetensors", "clusters.safetensors", "elrea.json", "figure4.*", "regroups.*", "conflict.*",
            "coactivation.*"),
    "evaluation": ("metrics_*",),
    "peft export": ("adapter_model.safetensors", "adapter_config.json"),
    "merged model": ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                     "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"),
    "angles": ("figure4.*",),
    "study": ("study.json", "summary.*", "*.png", "cells", "logs"),
}
_CLAIMED = []  # folders this process created and marked: released at exit if it wrote nothing into them


def marker(folder) -> dict | None:
    """The marker of a folder the project made ({"kind", "made_by", and "of" for a run's derived files}), or None."""
    try:
        found = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) and isinstance(found.get("kind"), str) else None


def kind_of(folder) -> str | None:
    """The kind ("run", "study", "export", "prepared model", ...) of a folder the project made, or None."""
    return (marker(folder) or {}).get("kind")


def mark(folder, kind: str, by: str, of=None, created=None):
    """Make `folder` and record that `by` made it, as a folder of `kind` (of: the run its files derive from). A folder
    that existed without our marker is the user's: it gets none (files.py's rule), so nothing in it is ever replaced.
    created: whether this process made the folder (default: whether it does not exist yet)."""
    folder = Path(folder)
    created = not folder.exists() if created is None else created
    folder.mkdir(parents=True, exist_ok=True)
    if created or marker(folder) is not None:
        write_json(folder / MARKER, {"kind": kind, "made_by": by, **({"of": str(Path(of).resolve())} if of else {})})
    if created:
        _CLAIMED.append(folder)


@atexit.register
def _release_unused():
    """A folder this process created and marked but wrote nothing into (the command failed first) is removed, so that
    its marker cannot later vouch for files the user puts there."""
    for folder in _CLAIMED:
        try:
            if folder.is_dir() and not contents(folder):
                for name in (MARKER, ".lock"):
                    (folder / name).unlink(missing_ok=True)
                folder.rmdir()
        except OSError:
            pass


def contents(folder) -> list[Path]:
    """The entries of a folder, the marker and a lock file aside."""
    return [p for p in Path(folder).iterdir() if p.name not in (MARKER, ".lock")] if Path(folder).is_dir() else []


def ours(entry: Path, kind: str, also=()) -> bool:
    """Whether an entry of a `kind` folder is one that kind's command writes (WRITES, or `also`: a run's task folders)."""
    names = WRITES.get(kind, ()) + tuple(also)
    return (any(fnmatch.fnmatchcase(entry.name, n) or fnmatch.fnmatchcase(entry.name, n + ".????????") for n in names)
            or entry.is_dir() and not entry.is_symlink() and marker(entry) is not None)


def foreign(folder, kind: str, also=()) -> list[Path]:
    """The entries of a folder that its command did not write: a user's files, or links."""
    return [p for p in contents(folder) if p.is_symlink() or not ours(p, kind, also)]


def describe(paths: list[Path]) -> str:
    return ", ".join(p.name for p in paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


def new_folder(folder, kind: str, by: str, flag: str, of=None, also=()):
    """The folder a command writes into: made and marked, or already ours (of this kind, for the same run `of`,
    holding only what this kind writes, WRITES or `also`), or empty; anything else is refused before anything is
    written."""
    folder = Path(folder)
    check_writable_path(folder, flag)
    found = marker(folder)
    if contents(folder):
        if found is None or found["kind"] != kind:
            raise InputError(f"{flag} {folder} already holds files that {by} did not write"
                             + (f" (a {found['kind']})" if found else f" (it has no {MARKER} marker)")
                             + f"; choose another {flag}, or an empty folder.")
        if of is not None and found.get("of") not in (None, str(Path(of).resolve())):
            raise InputError(f"{flag} {folder} holds the {kind} of another run ({found['of']}), which this command would "
                             f"replace; choose another {flag}.")
        if bad := foreign(folder, kind, also):
            raise InputError(f"{flag} {folder} holds files that {by} did not write ({describe(bad)}); move them "
                             f"away, or choose another {flag}.")
    check_no_links(folder, flag)
    mark(folder, kind, by, of)
    return folder


def check_writable_path(folder: Path, flag: str):
    """Refuse a folder path that is a file, or lies under one (mkdir would fail with NotADirectoryError)."""
    for p in [folder, *folder.parents]:
        if p.exists():
            if not p.is_dir():
                raise InputError(f"{flag} {folder}: {'it' if p == folder else p} is a file, not a folder; "
                                 f"choose another {flag}.")
            return


def check_no_links(folder, flag: str):
    """Refuse an output folder holding a symbolic link: a write or a delete through it could reach outside."""
    folder = Path(folder)
    if folder.is_symlink():
        raise InputError(f"{flag} {folder} is a symbolic link; give the folder it points to ({folder.resolve()}).")
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            if (Path(root) / name).is_symlink():
                raise InputError(f"{flag} {folder} holds a symbolic link, {Path(root) / name}: writing through it "
                                 f"would change a file outside the folder. Replace it with a copy, or choose another {flag}.")


def check_apart(outputs: dict, inputs: dict):
    """Refuse an output path that lies inside an input of the same command, or holds one ({flag: path}; None is
    skipped): writing or deleting there would change what the command reads."""
    for out_flag, out in outputs.items():
        for in_flag, src in inputs.items():
            if out is None or src is None or not Path(src).exists():
                continue
            if inside(out, src) or inside(src, out):
                where = "is" if Path(out).resolve() == Path(src).resolve() else "lies inside" if inside(out, src) else "holds"
                raise InputError(f"{out_flag} {out} {where} {in_flag} {src}: the command would write where it reads. "
                                 f"Choose another {out_flag}.")


def empty_folder(folder, kind: str, flag: str, also=()):
    """Remove what a folder of ours holds (the marker and lock stay), refusing one without our marker of `kind` and
    one holding anything its command did not write (also: more names it wrote, a run's task folders)."""
    folder = Path(folder)
    if kind_of(folder) != kind:
        found = f"a {kind_of(folder)}, not a {kind}" if kind_of(folder) else f"no {MARKER} marker"
        raise InputError(f"{flag} {folder}: refusing to delete its contents: it holds {found}, so this project did "
                         f"not make it as a {kind}. Delete it yourself if it is expendable, or choose another {flag}.")
    if bad := foreign(folder, kind, also):
        raise InputError(f"{flag} {folder}: refusing to delete its contents: it holds files this project did not write "
                         f"({describe(bad)}). Move them away first, or choose another {flag}.")
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
            record = json.loads(line)
        except json.JSONDecodeError:
            if any(rest.strip() for rest in lines[i + 1:]):
                raise InputError(f"{file}: line {i + 1} is not valid JSON, and lines follow it: the log was edited "
                                 f"or damaged; restore it from a copy, or delete the line.") from None
            print(f"note: {file}: the last line is incomplete (the run was stopped while writing it); it is ignored.",
                  file=sys.stderr)
            continue
        if not isinstance(record, dict):
            raise InputError(f"{file}: line {i + 1} is {line.strip()[:40]!r}, not a record ({{...}}): the log was edited or "
                             f"damaged; restore it from a copy, or delete the line.")
        records.append(record)
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


# ----------------------------------------------------------------------------------------------
# Records read back: checked by schema where they are read, so that a file of the wrong shape is one clear error

# A schema maps a field to its type: a type, a tuple of types, [type] for a list of them, or a schema for a dict.
# A field named with a trailing "?" may be absent.
NUMBER = (int, float)
RUN_CONFIG = {"method": str, "setting": str, "tasks": [str], "model?": str, "data?": str, "targets?": [str],
              "num_experts?": int, "rank?": int, "alpha?": NUMBER, "seed?": int, "epochs?": int, "lr?": NUMBER,
              "batch_size?": int, "max_len?": int, "max_answer_len?": int, "max_new_tokens?": int, "eval?": str,
              "dtype?": str, "task_ids?": [str]}  # what eval.py reads; --resume needs every flag (train.resumed_args)
LOG_ENTRY = {"phase": int, "step": int, "loss?": NUMBER}  # every line of a run's log.jsonl
TRAINER_STATE = {"phase": int, "epoch": int, "batch": int, "step": int, "param_groups": [dict], "scheduler": dict,
                 "files?": dict}
METRICS = {"rougeL": NUMBER, "exact_match": NUMBER, "per_task": dict}
ADAPTER_CONFIG = {"method": str, "targets": [str], "rank": int, "alpha": NUMBER}
CONTINUAL = {"order": [str], "rougeL": [list], "exact_match": [list]}
TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "an object {...}",
              list: "a list [...]", NUMBER: "a number"}


def check_record(record, schema: dict, file, fix: str, where=""):
    """Refuse a record that lacks a field of `schema` or holds one of another type, naming the file and the field."""
    def name(t):
        if isinstance(t, list):
            return "a list of " + {str: "strings", int: "integers", dict: "objects", list: "lists"}.get(t[0], "values")
        if isinstance(t, tuple) and t != NUMBER:
            return " or ".join(name(x) for x in t)
        return TYPE_NAMES.get(t, "null" if t is type(None) else "an object {...}")

    def fits(value, t):
        if isinstance(t, list):
            return isinstance(value, list) and all(fits(v, t[0]) for v in value)
        if isinstance(t, dict):
            return isinstance(value, dict)
        if isinstance(t, tuple) and any(isinstance(x, list) for x in t):
            return any(fits(value, x) for x in t)
        return isinstance(value, t) and not (isinstance(value, bool) and t is not bool and bool not in (t if isinstance(t, tuple) else (t,)))

    if not isinstance(record, dict):
        raise InputError(f"{file}: {where or 'the file'} is {json.dumps(record)[:40]}, not an object {{...}}: it is not "
                         f"the record this command reads; {fix}.")
    for key, t in schema.items():
        field = key.rstrip("?")
        if field not in record:
            if key.endswith("?"):
                continue
            raise InputError(f"{file}: the field {where + field!r} is missing; {fix}.")
        if not fits(record[field], t):
            raise InputError(f"{file}: the field {where + field!r} is {json.dumps(record[field])[:40]}, not {name(t)}; {fix}.")
        if isinstance(t, dict):
            check_record(record[field], t, file, fix, where + field + ".")
    return record


def read_record(file, schema: dict, fix: str):
    """A JSON record the project reads back, checked against `schema` (check_record) at the point of reading."""
    return check_record(read_json(file, fix), schema, file, fix)


def write_signed(path, text: str, by: str):
    """A text file whose last line says `by` wrote it, with the hash of what comes before: only such a file, unchanged,
    is ever replaced (replaceable), so a user's file of the same name is never overwritten."""
    check_replaceable(path, by, "--out")
    body = text if text.endswith("\n") else text + "\n"
    atomic_write(path, lambda f: Path(f).write_text(body + signature(body, by), encoding="utf-8"))


def signature(body: str, by: str) -> str:
    return f"<!-- written by {by}; sha256 {hashlib.sha256(body.encode()).hexdigest()[:16]} -->\n"


def check_replaceable(path, by: str, flag: str):
    """Refuse to replace a file unless write_signed wrote it and nobody changed it since."""
    path = Path(path)
    if path.is_symlink() or path.exists() and not path.is_file():
        raise InputError(f"{flag} {path} is {'a symbolic link' if path.is_symlink() else 'a folder'}; give a new file name.")
    if not path.exists():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    body, _, last = text[:-1].rpartition("\n") if text.endswith("\n") else ("", "", text)
    if not last or signature(body + "\n", by) != last + "\n":
        raise InputError(f"{flag} {path} exists and is not a file that {by} wrote (or it was edited since): it is not "
                         f"replaced. Give a new file name, or move the file away.")
