"""A run directory's mechanics, and the processes that share it (train.py's loop calls these).

    check_out / claim_run_dir    what --out may be (files.py's rule: only a folder train.py made is ever emptied),
                                 then the folder made, locked and marked before the first write
    save_checkpoint / load_checkpoint / checkpoint_folder
                                 checkpoint/: the adapter, AdamW, the schedule, the regroup signal, every rank's RNG
                                 and the position; safetensors and JSON, never pickle; replaced as a whole
    resume_phase                 --resume: the checkpoint restored, log.jsonl trimmed to it (a crash between checkpoints)
    StopRequests                 the Ctrl-C protocol: a checkpoint at the end of the step, a second Ctrl-C stops at once
    check_same_data              --resume refuses data that changed since the run began
    setup_distributed / all_reduce_gradients
                                 torchrun: one process per device, gloo on CPU, nccl on GPU
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import save_file
from tqdm import tqdm

from adapter_files import save_adapters
from badit import routed_adapters
from checks import InputError, os_error
from data import CLASSROOM, SUPERNI, superni_cache
from files import (LOG_ENTRY, MARKER, TRAINER_STATE, check_record, atomic_write, check_apart, check_no_links, check_writable_path, contents, describe,
                   empty_folder, foreign, kind_of, lock_folder, mark, read_jsonl, read_record, read_safetensors)
from hf import resolve_device


class Stop(Exception):
    """Training must stop: Ctrl-C (a checkpoint was saved, exit code 130), a non-finite loss or a failed
    checkpoint write (1)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# ----------------------------------------------------------------------------------------------
# The run directory


def check_out(args):
    """Refuse an --out that this run may not write to, before anything is written (files.py's rule: train.py
    only ever empties a folder it made, which carries its marker, and never the one holding --model)."""
    run_dir = Path(args.out)
    check_writable_path(run_dir, "--out")
    check_apart({"--out": run_dir}, {"--model": args.model, "--data": data_root(args.data)})
    check_no_links(run_dir, "--out")
    kind = kind_of(run_dir)
    if args.resume:
        if kind not in (None, "run"):
            raise InputError(f"--out {run_dir} is a {kind}, not a run: --resume continues a run directory of train.py.")
        return
    if not contents(run_dir):
        return
    if kind is None and (run_dir / "config.json").is_file() and (run_dir / "log.jsonl").is_file():
        raise InputError(f"{run_dir} holds a run made before run directories were marked (no {MARKER}): continue it "
                         f"with `python train.py --out {run_dir} --resume`, or delete it yourself to reuse the folder.")
    if kind != "run":
        raise InputError(f"{run_dir} is not empty and holds no run of train.py"
                         + (f" (it is a {kind})" if kind else "") + "; choose another --out.")
    if not args.overwrite and progressed(run_dir):
        raise InputError(f"{run_dir} already holds a run: continue it with `python train.py --out {run_dir} --resume`, "
                         f"replace it with --overwrite, or choose another --out.")
    if not args.overwrite and (kept := [p for p in contents(run_dir) if p.name not in BEFORE_FIRST_STEP]):
        raise InputError(f"{run_dir} holds a run that never finished a step, with files a restart would delete "
                         f"({describe(kept)}): replace it with --overwrite, or choose another --out.")
    if bad := foreign(run_dir, "run", run_tasks(run_dir)):
        raise InputError(f"--out {run_dir} holds files that train.py did not write ({describe(bad)}): a new run there "
                         f"would delete them. Move them away, or choose another --out.")


BEFORE_FIRST_STEP = ("config.json", "log.jsonl")  # what a run that failed before its first step holds: cheap to redo


def run_tasks(run_dir: Path) -> list[str]:
    """The task names of a run's config.json (a single-task run's folders bear them), or [] if it has none."""
    try:
        tasks = json.loads((run_dir / "config.json").read_text()).get("tasks", [])
        return [t for t in tasks if isinstance(t, str)]
    except (OSError, ValueError, AttributeError):
        return []


def data_root(data: str):
    """--data as a folder (superni: the downloaded benchmark), or None for the embedded classroom suite."""
    return None if data == CLASSROOM else superni_cache() if data == SUPERNI else data


def progressed(run_dir: Path) -> bool:
    """Whether a run got past its first optimizer step anywhere (a task, a phase, an ELREA stage)."""
    return (any(run_dir.rglob("trainer.json")) or any(run_dir.rglob("adapter.safetensors"))
            or any("loss" in e for log in run_dir.rglob("log.jsonl") for e in read_jsonl(log)))


def claim_run_dir(args, rank: int):
    """Rank 0 makes and locks the run directory (check_out has cleared it) and marks it as a run; --overwrite
    empties it, and so does a new command on a run that never finished a step (it restarts with the new
    flags). -> the lock (keep it)."""
    run_dir = Path(args.out)
    if rank != 0:
        return None
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_folder(run_dir, "train.py", "--out")
    try:
        check_out(args)  # again, under the lock
        if not args.resume and contents(run_dir):
            if not args.overwrite:
                print(f"{run_dir} holds a run that never finished a step: it restarts with this command's flags.")
            empty_folder(run_dir, "run", "--out", run_tasks(run_dir))
        mark(run_dir, "run", "train.py", created=created)
    except BaseException:
        if lock:
            lock.close()
        raise
    return lock


def check_same_data(args, now: dict):
    """--resume refuses data that changed since the run began (another file, a tokenizer, a task), naming it."""
    saved = getattr(args, "data_fingerprint", None)
    if saved is None:
        print(f"note: {args.out} was made before runs recorded their data's fingerprint: the data is not checked.")
        return
    changed = []
    for split in ("train", "test"):
        for task in sorted(set(saved[split]) | set(now[split])):
            was, new = saved[split].get(task), now[split].get(task)
            if was != new:
                changed.append(f"{split} {task}: " + ("gone" if new is None else "new" if was is None else
                               f"{was['examples']} -> {new['examples']} examples" if was["examples"] != new["examples"]
                               else "the examples differ (their text, or the tokenizer)"))
    if changed:
        raise InputError(f"{args.out} was trained on other data than --data {args.data} holds now ({'; '.join(changed[:4])}"
                         f"{f'; and {len(changed) - 4} more' if len(changed) > 4 else ''}): a resumed run would mix them. "
                         f"Restore the data the run began with, or start a new run (another --out, or --overwrite).")


def check_same_model(args, now: dict):
    """--resume refuses a base model whose files changed since the run began (a weight, a config value, the
    tokenizer), naming them: the adapter was trained on the model as it was."""
    saved = getattr(args, "model_fingerprint", None)
    if saved is None:
        print(f"note: {args.out} was made before runs recorded their model's fingerprint: the model is not checked.")
        return
    changed = sorted(n for n in set(saved) | set(now) if saved.get(n) != now.get(n))
    if changed:
        raise InputError(f"the model {args.model} changed since {args.out} began ({', '.join(changed[:4])}"
                         f"{f' and {len(changed) - 4} more' if len(changed) > 4 else ''} differ): the run's adapter was "
                         f"trained on the model as it was. Restore the model, or start a new run (another --out, or "
                         f"--overwrite).")


# ----------------------------------------------------------------------------------------------
# Checkpoints: safetensors for tensors, JSON for the rest, never pickle. A checkpoint is written to
# checkpoint.new/ and then renamed over checkpoint/ (the old one goes to checkpoint.old/ for the
# instant between the two renames), so a failed write leaves the previous checkpoint whole.

DAMAGED = "the checkpoint is damaged; restore the run directory from a copy, or start again with --overwrite"
DAMAGED_RUN = "the run directory is damaged; restore it from a copy, or start again with --overwrite"
DAMAGED_LOG = "the log was edited or damaged; restore it from a copy, or delete the line"


def checkpoint_folder(ckpt: Path) -> Path | None:
    """The last checkpoint: ckpt, or ckpt.old after a crash between the two renames (only if complete: a kill during
    its deletion leaves it half-deleted; trainer.json, written last, lists every file with its size), or None. A
    damaged ckpt is returned, so that loading it names the damage."""
    if (ckpt / "trainer.json").is_file():
        return ckpt
    old = ckpt.with_name(ckpt.name + ".old")
    return old if complete(old) else None


def complete(folder: Path) -> bool:
    try:
        listed = json.loads((folder / "trainer.json").read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return False
    if not isinstance(listed, dict):  # a checkpoint of before the list: its files must all be there
        listed = {n: None for n in ("trainer.safetensors", "adapter.safetensors", "adapter_config.json")}
    return all((folder / n).is_file() and size in (None, (folder / n).stat().st_size) for n, size in listed.items())


EXPLODED = 1e4  # an adapter weight this large has blown up: trained ones stay within a few units (SVD pieces: sqrt(sigma))


def check_trainable(model, ckpt: Path, when: str):
    """Stop (exit 1) before a checkpoint of adapter weights that are not finite or have blown up: the last good
    checkpoint stays."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    largest = torch.stack([p.detach().abs().max().float() for _, p in params]).max().item() if params else 0.0
    if not math.isfinite(largest) or largest > EXPLODED:
        name = next(n for n, p in params if not torch.isfinite(p).all() or p.detach().abs().max().item() > EXPLODED)
        raise Stop(f"the adapter has blown up {when}: {name} holds {'non-finite values' if not math.isfinite(largest) else f'a weight of {largest:.3g}'} "
                   f"(trained adapters stay within a few units). Training stopped; the last good checkpoint is kept in {ckpt} "
                   f"(if an epoch had finished). Lower --lr.", exit_code=1)


def save_checkpoint(model, optimizer, scheduler, position: dict, ckpt: Path, rank: int, world: int):
    """Every rank's RNG state, and (rank 0) the adapter, optimizer, scheduler, regroup signal and position."""
    rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})}
    ranks = [rng]
    if world > 1:
        ranks = [None] * world
        dist.all_gather_object(ranks, rng)
    if rank == 0:
        opt = optimizer.state_dict()
        tensors = {f"optimizer.{i}.{k}": v for i, s in opt["state"].items() for k, v in s.items()}
        for name, a in routed_adapters(model).items():
            if hasattr(a, "signal_sum"):
                tensors[f"signal.{name}.sum"], tensors[f"signal.{name}.last"] = a.signal_sum, a.signal_last
            if hasattr(a, "angle_sum"):  # --angles-every's window, so that a resumed run logs the same angles
                tensors[f"angles.{name}.sum"] = a.angle_sum
        tensors |= {f"rng.{kind}.{r}": state for r, states in enumerate(ranks) for kind, state in states.items()}
        state = {**position, "world": world, "param_groups": opt["param_groups"], "scheduler": scheduler.state_dict()}
        new, old = ckpt.with_name(ckpt.name + ".new"), ckpt.with_name(ckpt.name + ".old")
        try:
            shutil.rmtree(new, ignore_errors=True)
            new.mkdir(parents=True)
            save_adapters(model, new)
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, new / "trainer.safetensors")
            files = {f.name: f.stat().st_size for f in new.iterdir()}
            (new / "trainer.json").write_text(json.dumps({**state, "files": files}, indent=1))  # last: it vouches for the rest
            if ckpt.exists() and old.exists():  # a kill left ckpt and a stale old: old is not needed
                shutil.rmtree(old)
            if ckpt.exists():
                ckpt.rename(old)
            new.rename(ckpt)
        except (OSError, SafetensorError) as e:
            shutil.rmtree(new, ignore_errors=True)
            last = f"the previous checkpoint in {checkpoint_folder(ckpt)} is intact" if checkpoint_folder(ckpt) else "no checkpoint was written yet"
            raise Stop(f"could not write the checkpoint ({os_error(e) if isinstance(e, OSError) else e}); {last}: free "
                       f"disk space (or make {ckpt.parent} writable) and continue with "
                       f"`python train.py --out {ckpt.parent} --resume`.", exit_code=1) from None
        shutil.rmtree(old, ignore_errors=True)
    if world > 1:
        dist.barrier()


def load_checkpoint(model, optimizer, scheduler, folder: Path, rank: int, seed: int) -> dict:
    """Restore what save_checkpoint wrote (the adapter itself is loaded by attach_adapters); -> position."""
    state = read_record(folder / "trainer.json", TRAINER_STATE, DAMAGED)
    state.pop("files", None)
    tensors = read_safetensors(folder / "trainer.safetensors", DAMAGED)
    device = model.lm_head.weight.device
    opt_state = {}
    for key, v in tensors.items():
        if key.startswith("optimizer."):
            _, i, k = key.split(".", 2)
            opt_state.setdefault(int(i), {})[k] = v if k == "step" else v.to(device)
    groups = [{**g, "betas": tuple(g["betas"])} for g in state.pop("param_groups")]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    names = {id(p): n for n, p in model.named_parameters()}
    wrong = [f"{names.get(id(params[i]), f'parameter {i}')} {tuple(params[i].shape)} against {tuple(v.shape)} saved"
             for i, s in opt_state.items() for k, v in s.items() if k != "step" and (i >= len(params) or v.shape != params[i].shape)]
    if wrong or len(opt_state) > len(params):
        found = "; ".join(wrong[:3]) or "more parameters saved than this model trains"
        raise InputError(f"{folder}: the optimizer state does not fit this model's adapters ({found}): the checkpoint "
                         f"was written with other adapter settings (--num-experts, --rank, --targets). Resume with the "
                         f"run's own config.json (train.py --out RUN --resume), or start a new run.")
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    scheduler.load_state_dict(state.pop("scheduler"))
    for name, a in routed_adapters(model).items():
        if f"signal.{name}.sum" in tensors:
            a.register_buffer("signal_sum", tensors[f"signal.{name}.sum"].to(device), persistent=False)
            a.register_buffer("signal_last", tensors[f"signal.{name}.last"].to(device), persistent=False)
        if f"angles.{name}.sum" in tensors:
            a.register_buffer("angle_sum", tensors[f"angles.{name}.sum"].to(device), persistent=False)
    if f"rng.cpu.{rank}" in tensors:  # each rank continues its own dropout stream
        torch.set_rng_state(tensors[f"rng.cpu.{rank}"])
        if f"rng.cuda.{rank}" in tensors and device.type == "cuda":
            torch.cuda.set_rng_state(tensors[f"rng.cuda.{rank}"])
    else:
        print(f"rank {rank}: {folder} was written by {state.get('world', '?')} process(es); this rank's dropout "
              f"continues from a new seed, so the run will differ from an uninterrupted one.")
        torch.manual_seed(seed + 1000 * (rank + 1) + state["step"])
    return state


def resume_phase(model, optimizer, scheduler, run_dir: Path, phase: int, rank: int, seed: int) -> tuple[int, int, int]:
    """--resume: restore the checkpoint if it is this phase's and trim log.jsonl to it -> (epoch, batch, step)
    to continue from ((0, 0, 0): the phase starts over)."""
    ckpt, position = run_dir / "checkpoint", (0, 0, 0)
    folder = checkpoint_folder(ckpt)
    if folder is not None:
        saved = load_checkpoint(model, optimizer, scheduler, folder, rank, seed)
        if saved["phase"] != phase:  # copied from another run, or another task's folder: not this run's state
            raise InputError(f"{folder} is the checkpoint of phase {saved['phase'] + 1} (a task of a continual run), "
                             f"and this run resumes phase {phase + 1}: it is not this run's checkpoint. Restore the "
                             f"run directory from a copy, or start again with --overwrite.")
        position = saved["epoch"], saved["batch"], saved["step"]
        if rank == 0:
            print(f"resuming {run_dir} at epoch {position[0] + 1}, batch {position[1]}, step {position[2]}")
    elif rank == 0 and (lost := logged_steps(run_dir / "log.jsonl", phase)):
        print(f"no checkpoint in {ckpt} (the run stopped before its first epoch ended): the {lost} logged steps "
              f"of this phase are discarded; it restarts at step 0.")
    if rank == 0:
        trim_log(run_dir / "log.jsonl", phase, position[2])
    return position


class StopRequests:
    """The Ctrl-C protocol, around a phase: the first Ctrl-C (or SIGTERM) asks for a checkpoint at the end of
    the step under way (`requested`; the loop agrees on it across ranks), a second stops at once."""

    def __init__(self, rank: int):
        self.rank, self.requested = rank, False

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def on_signal(self, signum, _):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.rank == 0:
            tqdm.write(f"{'Ctrl-C' if signum == signal.SIGINT else 'SIGTERM'}: saving a checkpoint after this step "
                       f"(send it again to stop without saving) ...")

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def read_log(file: Path) -> list[dict]:
    """log.jsonl's records, each checked (LOG_ENTRY: every line has its phase and step)."""
    return [check_record(e, LOG_ENTRY, file, DAMAGED_LOG, where=f"line {i + 1}: ") for i, e in enumerate(read_jsonl(file))]


def logged_steps(file: Path, phase: int) -> int:
    return sum(1 for e in read_log(file) if "loss" in e and e["phase"] == phase)


def trim_log(file: Path, phase: int, step: int):
    """Drop log lines written after the checkpoint (a crash between checkpoints), so steps are not repeated,
    and a last line torn by a kill during its write."""
    if file.is_file():
        keep = [e for e in read_log(file) if (e["phase"], e["step"]) <= (phase, step)]
        atomic_write(file, lambda f: Path(f).write_text("".join(json.dumps(e) + "\n" for e in keep)))


# ----------------------------------------------------------------------------------------------
# Processes (torchrun)


def setup_distributed(args):
    """(rank, world size, device). Under torchrun: one process per device, gloo on CPU, nccl on GPU."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    device = resolve_device(args.device)
    if device.type == "cuda":
        if world > 1:
            device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))  # rank 0 evaluates alone
    return rank, world, device


def all_reduce_gradients(params):
    """Sum the gradients over ranks, in one flat buffer (the adapters are small)."""
    flat = torch.cat([p.grad.flatten() for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
