"""Bad input, found before any work: the error type every command line prints, the argparse types,
and which flags belong to which method.

An InputError is something the user can fix: its message names the flag, file or field and says
what to do. Every command line runs its main() through `command`, which prints one as a single
paragraph and exits 2, without a traceback. Any other exception is a bug and keeps its traceback.
"""

import argparse
import errno
import math
import os
import sys


class InputError(ValueError):
    """Bad input: a flag, a file or a field. The message names it and says how to fix it."""


class MissingFile(InputError, FileNotFoundError):
    """A file or folder the user pointed at does not exist."""


def command(main):
    """Run a command-line main(): an InputError, or an error of the operating system (a full disk, a read-only folder,
    a missing permission), is printed as one paragraph naming the file, exit status 2; Ctrl-C ends with 130 and a
    closed output pipe (`... | head -1`) quietly; anything else is a bug and keeps its traceback."""
    try:
        return main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # the reader of our output went away: nothing more to say, to anyone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)  # as a shell reports a process ended by SIGPIPE
    except KeyboardInterrupt:
        print("\ninterrupted.", file=sys.stderr)
        sys.exit(130)
    except OSError as e:
        print(f"error: {os_error(e)}", file=sys.stderr)
        sys.exit(2)


FIXES = {errno.ENOSPC: "free disk space", errno.EDQUOT: "free disk space (the quota is full)",
         errno.EROFS: "the file system is read-only: choose a writable folder",
         errno.EACCES: "you lack the permission: fix it (chmod) or choose another folder",
         errno.EPERM: "you lack the permission: fix it (chmod) or choose another folder",
         errno.ENOENT: "check the path", errno.ENOTDIR: "a part of the path is a file, not a folder",
         errno.EISDIR: "it is a folder where a file is expected", errno.EMFILE: "too many files are open: raise ulimit -n"}


def os_error(e: OSError) -> str:
    """An error of the operating system as one sentence: what, on which file, and what to do."""
    where = f"{e.filename}" + (f" -> {e.filename2}" if getattr(e, "filename2", None) else "") if e.filename else "a file"
    fix = FIXES.get(e.errno, "check the path, the disk and the permissions")
    return f"{where}: {e.strerror or e} ({errno.errorcode.get(e.errno, 'OSError')}); {fix}, then run the command again."


# ----------------------------------------------------------------------------------------------
# argparse types


def number(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: a finite int or float within bounds; argparse prints the flag's name with the error."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if not math.isfinite(value) or too_low or too_high:
            bounds = " and ".join(b for b in (low is not None and f"{'>' if low_open else '>='} {low}",
                                              high is not None and f"{'<' if high_open else '<='} {high}") if b)
            raise argparse.ArgumentTypeError(f"{text} must be {bounds}")
        return value
    return parse


positive_int = number(int, 1)


def names(text):
    """An argparse type: a comma-separated list of distinct, non-empty names."""
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or not all(items):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty name; give comma-separated names, e.g. a,b")
    if len(set(items)) < len(items):
        raise argparse.ArgumentTypeError(f"{text!r} names something twice")
    return items


# ----------------------------------------------------------------------------------------------
# Which method reads which flag. A flag of another method would be silently ignored, so it is
# refused instead; flags not listed here apply to every method.

ROUTED = ("loramoe", "badit-noregroup", "badit", "badit-nobad")
METHOD_FLAGS = {
    "--lora-rank": ("lora", "pissa", "elrea", "o-lora", "gainlora"),
    "--orth-lambda": ("o-lora",),
    "--l2-lambda": ("o-lora",),
    "--top-k": ("loramoe",),  # badit's SVD experts would not start at the base function (METHOD.md section 4)
    "--common-experts": ("cgc",),
    "--task-experts": ("cgc",),
    "--regroup-every": ("badit", "badit-nobad"),
    "--regroup-until": ("badit", "badit-nobad"),
    "--regroup-signal": ("badit", "badit-nobad"),
    "--angles-every": ROUTED,
    "--clusters": ("elrea",),
    "--proj-dim": ("elrea",),
    "--feature-epochs": ("elrea",),
    "--expert-lr": ("elrea",),
}


def check_method_flags(method: str, given: set[str]):
    """Refuse the flags in `given` that `method` does not read (METHOD_FLAGS)."""
    foreign = [f for f in sorted(given) if f in METHOD_FLAGS and method not in METHOD_FLAGS[f]]
    if foreign:
        raise InputError("; ".join(f"{f} is for {', '.join(METHOD_FLAGS[f])} only" for f in foreign)
                         + f": --method {method} would ignore {'it' if len(foreign) == 1 else 'them'}. "
                         f"Drop {', '.join(foreign)}, or choose the method {'it belongs' if len(foreign) == 1 else 'they belong'} to.")
