"""Run train.py with a fault injected, in a real process (alone or under torchrun), for the tests.

    python tests/faults.py [FAULT ...] <train.py arguments, from the first --flag on>

FAULT:
    interrupt@N   every rank sends itself SIGINT (a Ctrl-C) during optimizer step N
    diskfull@N    the N-th write of trainer.safetensors fails with "No space left on device"
    readonly@N    the N-th write of trainer.safetensors fails as safetensors fails in a read-only folder
    disagree      rank 1 clusters a perturbed regroup signal, as a nondeterministic kernel might
    ranks         every rank also writes its final adapter to <out>/rank<R>.safetensors
"""

import errno
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

import adapter_files  # noqa: E402
import badit  # noqa: E402
import runs  # noqa: E402
import train  # noqa: E402
from checks import command  # noqa: E402


def inject(fault: str):
    kind, _, n = fault.partition("@")
    rank = int(os.environ.get("RANK", 0))
    calls = []
    if kind == "interrupt":
        original = train.backward_global_batch

        def backward_global_batch(*args):
            calls.append(1)
            if len(calls) == int(n):
                os.kill(os.getpid(), signal.SIGINT)
            return original(*args)

        train.backward_global_batch = backward_global_batch
    elif kind == "diskfull":
        original = runs.save_file

        def save_file(tensors, file):
            calls.append(1)
            if len(calls) == int(n):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
            return original(tensors, file)

        runs.save_file = save_file
    elif kind == "readonly":  # what safetensors itself raises when the folder is read-only (not an OSError)
        from safetensors import SafetensorError

        original = runs.save_file

        def save_file(tensors, file):
            calls.append(1)
            if len(calls) == int(n):
                raise SafetensorError('Error while serializing: IoError(Os { code: 30, kind: ReadOnlyFilesystem, '
                                      'message: "Read-only file system" })')
            return original(tensors, file)

        runs.save_file = save_file
    elif kind == "disagree":
        original = badit.spherical_kmeans

        def spherical_kmeans(x, *args, **kw):
            if rank == 1:
                x = x + 0.5 * x.norm(dim=-1, keepdim=True) * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
            return original(x, *args, **kw)

        badit.spherical_kmeans = spherical_kmeans
    elif kind == "ranks":
        from safetensors.torch import save_file

        original = train.finish

        def finish(model, tok, args, test, run_dir, rank):
            save_file(adapter_files.adapter_state(model), Path(run_dir) / f"rank{rank}.safetensors")
            return original(model, tok, args, test, run_dir, rank)

        train.finish = finish
    else:
        raise SystemExit(f"unknown fault {fault!r}")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--"]
    split = next((i for i, a in enumerate(args) if a.startswith("--")), len(args))
    for fault in args[:split]:
        inject(fault)
    command(lambda: train.main(args[split:]))
