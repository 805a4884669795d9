"""Studies: every method over seeds, and hyperparameter experiments; each cell an ordinary train.py run.

    python study.py classroom                      # a named study (STUDIES below); run it again to continue
    python study.py superni --summary              # the summary of the cells that have finished
    python study.py lr-sweep --methods badit,lora --seeds 0,1,2 --single --vary lr=1e-4,2e-4,5e-4 -- --epochs 3
    python study.py classroom --launcher torchrun --nproc 4      # every cell data-parallel on 4 GPUs

The cells run one after another, each as `python train.py --out studies/<name>/<cell> ...` in its own
process. A finished cell is skipped and an interrupted one resumed (train.py --resume), so a study
survives Ctrl-C and restarts. After every cell its small result files (configuration, scores, loss
curve, regroup angles, analyses; no adapters, no predictions) go to results/<name>/cells/<cell>/ and
the summary, results/<name>/summary.md and summary.json, is rewritten from those files alone
(METHOD.md section 8: every score a mean over seeds with its standard deviation; differences judged by
a paired sign-flip permutation test over seeds x tasks). PNG plots are added when matplotlib is installed.
"""

import argparse
import contextlib
import ctypes
import io
import itertools
import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from methods import ADAPTERS
from checks import InputError, command, names, positive_int
from data import CLASSROOM, SUPERNI
from eval import colla, continual_metrics, maybe_plot
from files import (MARKER, METRICS, atomic_write, check_no_links, check_writable_path, contents, empty_folder, kind_of,
                   lock_folder, mark, read_json, read_jsonl, read_record)
from runs import progressed
from train import parse_args

ROOT = Path(__file__).resolve().parent


@dataclass
class Cell:
    """One run of a study. kind: "train" (a train.py run), "base" (the base model evaluated once),
    "analysis" (eval.py conflict + coactivation on a train cell, `of`)."""

    id: str
    method: str = ""
    seed: int = 0
    setting: str = "mtl"
    variant: str = ""  # what differs from the method's plain cell, e.g. "lr=3e-4": a row of its own
    flags: list = field(default_factory=list)
    kind: str = "train"
    of: str = ""
    order: int | None = None  # continual: train.py's --order (None: its default)

    @property
    def row(self) -> str:
        return self.method + (f" [{self.variant}]" if self.variant else "")


def grid(methods, seeds, setting="mtl", variant="", flags=(), orders=(None,)) -> list[Cell]:
    """A cell per method x seed (x continual order): orders vary like seeds, the same row, paired by (order, seed)."""
    tag = "" if not variant else "-" + variant.replace(" ", "_").replace("/", "_")
    suffix = "" if setting == "mtl" else f"-{setting}"
    return [Cell(f"{m}{tag}{suffix}{'' if o is None else f'-o{o}'}-s{s}", m, s, setting, variant, list(flags), order=o)
            for m in methods for o in orders for s in seeds]


# ----------------------------------------------------------------------------------------------
# The named studies. Their configurations are fixed here before they run; a configuration changed
# after seeing results is a new study, reported beside the first (no tuning toward a method).

SEEDS = [0, 1, 2]
CONTINUAL_BASELINES = ["o-lora", "gainlora"]  # continual.py; "as implemented here" (its docstring)
ALL = list(ADAPTERS)  # every method train.py trains: the six adapters and elrea


SUPERNI_RECIPE = ["--data", SUPERNI, "--limit", "32", "--max-len", "512", "--epochs", "3", "--lr", "2e-4",
                  "--eval-limit", "20", "--eval", "after"]
# The two studies below ran before K = 8 and DOG (METHOD.md sections 2, 5): they pin K = 6, which was the default then.
BEFORE_DOG = ("K = 6 (the default when these cells ran). The badit cells were made by the regroup before DOG, that of "
              "commit 4fd4ee7 (spherical k-means seeded by the run's seed, then a greedy balanced fill; no orthogonal "
              "targets): today's code reruns them with DOG. The other methods' cells rerun as they ran.")


def classroom_study() -> dict:
    """The embedded suite with the classroom recipe (train.py RECIPES), every method over 3 seeds, the
    single-task runs of every method (colla), and four pre-declared ablations on lora and badit:
    the learning rate (3e-4, 3e-3 beside 1e-3), PEFT's scaling alpha / r_lora (alpha 32 x 4 / 24),
    float32 against bf16, and batches grouped by length against plain shuffling."""
    cells = [Cell("base", "base", kind="base")]
    cells += grid(["lora", "badit"], SEEDS)
    cells += grid(["lora"], SEEDS, "mtl", "s=1.33 (PEFT scaling)", ["--alpha", str(32 * 4 / 24)])
    cells += grid(["lora", "badit"], SEEDS, "mtl", "float32", ["--dtype", "float32"])
    cells += grid(["lora", "badit"], SEEDS, "mtl", "grouped batches", ["--group-by-length"])
    cells += grid(["pissa", "loramoe", "badit-noregroup", "cgc"], SEEDS)
    cells += grid([m for m in ALL if m != "elrea"], SEEDS, "single")
    for lr in ("3e-4", "3e-3"):
        cells += grid(["lora"], SEEDS, "mtl", f"lr={lr}", ["--lr", lr])
    cells += [Cell(f"analysis-{m}", m, kind="analysis", of=f"{m}-s0") for m in ALL if m != "elrea"]
    cells += grid(["elrea"], SEEDS) + grid(["elrea"], SEEDS, "single")
    return dict(flags=["--data", CLASSROOM, "--eval", "after", "--num-experts", "6"], cells=cells, reference="lora",
                notes=[BEFORE_DOG])


def superni_study() -> dict:
    """The paper's 15 SuperNI tasks on the demo model, scaled to this CPU: the first 32 training
    instances per task (480 in all), at most 512 tokens (the median prompt is about 240 tokens; the
    longest inputs are shortened, never the answer), 3 epochs (180 optimizer steps), the paper's
    learning rate 2e-4 and batch 8, the first 20 test instances per task (300 prompts). badit,
    badit-noregroup, loramoe and lora at 3 seeds; pissa, cgc and elrea at seed 0; single-task runs for
    lora and badit (colla); the continual setting for lora and badit at seed 0 last."""
    cells = [Cell("base", "base", kind="base")]
    cells += grid(["lora", "badit"], SEEDS) + grid(["badit-noregroup", "loramoe"], SEEDS)
    cells += grid(["lora", "badit"], SEEDS, "single")
    cells += grid(["pissa", "cgc", "elrea"], [0])
    cells += [Cell(f"analysis-{m}", m, kind="analysis", of=f"{m}-s0") for m in ("lora", "badit")]
    cells += [replace(c, order=0) for c in grid(["lora", "badit"], [0], "continual")]  # their ids as they ran
    return dict(flags=SUPERNI_RECIPE + ["--num-experts", "6"], cells=cells, reference="lora",
                notes=[BEFORE_DOG, "The continual cells ran before task orders existed: order 0, shuffled by --seed."])


def classroom_paper_study() -> dict:
    """The classroom suite and recipe with the paper's K = 8 and DOG (nothing else changed): lora, loramoe,
    badit-noregroup and badit at 3 seeds; the sequential setting for lora, loramoe and badit over orders 1, 2
    and 3 (the suite as listed, reversed, and a seeded permutation), and for the continual baselines o-lora and
    gainlora (added with them; order by order, before the cells below); single-task runs of lora and badit (colla); and
    badit at K = 6 with DOG (3 seeds), which against the classroom study's badit cells (K = 6, the old regroup,
    the same seeds) isolates DOG, and against this study's badit K."""
    cells = [Cell("base", "base", kind="base")]
    cells += grid(["lora", "loramoe", "badit-noregroup", "badit"], SEEDS)
    for order in (1, 2, 3):  # order by order, so that a study stopped early has every method at the first orders
        cells += grid(["lora", "loramoe", "badit", *CONTINUAL_BASELINES], [0], "continual", orders=[order])
    cells += grid(["lora", "badit"], SEEDS, "single")
    cells += grid(["badit"], SEEDS, "mtl", "K=6", ["--num-experts", "6"])
    cells += ablation_cells(CLASSROOM_ANGLES_EVERY, seeds=SEEDS, figure4=["loramoe", "badit-noregroup", "badit"],
                            single=["badit-nobad"])
    for order in (4, 5):  # the paper's 5 orders: 4 and 5 after the ablation
        for m in ["lora", "loramoe", "badit", *CONTINUAL_BASELINES, "badit-nobad"]:
            cells += grid([m], [0], "continual", orders=[order], flags=angles_flags(CLASSROOM_ANGLES_EVERY, m))
    return dict(flags=["--data", CLASSROOM, "--eval", "after"], cells=cells, reference="lora")


def superni_paper_study() -> dict:
    """The superni study's data and recipe (SUPERNI_RECIPE) with K = 8 and DOG: the paper's headline setting,
    sequential training of lora, gainlora, badit, o-lora and loramoe over orders 1, 2 and 3; then lora, loramoe,
    badit-noregroup and badit at 3 seeds, joint training; the ablation's cells (ablation_cells, with the single-task
    runs of lora, badit and badit-nobad); and badit at K = 6 with DOG (3 seeds, against the superni study's badit
    cells)."""
    cells = [Cell("base", "base", kind="base")]
    # the paper's headline setting first: sequential training over the benchmark's published orders 1 and 2 and a
    # seeded order 3 (25-70 minutes a cell on our CPUs), order by order; the paper's comparison (lora the reference,
    # gainlora its rival, badit) at all three orders before o-lora and loramoe at orders 2 and 3, so that a study
    # stopped early has its first comparison of 3 runs soonest
    for methods in (["lora", "gainlora", "badit"], ["o-lora", "loramoe"]):
        for order in (1, 2, 3):
            cells += grid(methods, [0], "continual", orders=[order])
    cells += grid(["lora", "loramoe", "badit-noregroup", "badit"], SEEDS)
    cells += ablation_cells(SUPERNI_ANGLES_EVERY, seeds=SEEDS, figure4=["loramoe", "badit"],
                            single=["lora", "badit", "badit-nobad"])
    cells += grid(["badit"], SEEDS, "mtl", "K=6", ["--num-experts", "6"])  # after the ablation: not part of its table
    return dict(flags=SUPERNI_RECIPE, cells=cells, reference="lora")


# The ablation's cells (grown onto both paper studies after they ran): the paper's "w/o BAD" row (badit-nobad)
# at the joint cells' seeds and the sequential cells' orders, so that each pairs with the committed rows; the
# single-task runs that ask whether badit's head start survives without the SVD; and the Figure 4 runs, the
# committed methods again with --angles-every (a diagnostic that changes no number: a row "[angles]" of its own,
# which must equal the committed one). Every badit-nobad cell carries the diagnostic.
CLASSROOM_ANGLES_EVERY = 4  # 192 steps a joint run: 48 points
SUPERNI_ANGLES_EVERY = 5  # 180 steps: 36 points


def angles_flags(every: int, method: str) -> list:
    return ["--angles-every", str(every)] if method in ("loramoe", "badit-noregroup", "badit", "badit-nobad") else []


def ablation_cells(every: int, seeds, figure4, single=()) -> list[Cell]:
    """Seed by seed (the single-task runs, then w/o BAD's joint run), so that a study stopped early has whole seeds of
    both ablation questions paired; then w/o BAD's sequential orders and the Figure 4 runs."""
    cells = []
    for seed in seeds:
        cells += grid(list(single), [seed], "single")
        cells += grid(["badit-nobad"], [seed], flags=angles_flags(every, "badit-nobad"))
    cells += grid(["badit-nobad"], [0], "continual", flags=angles_flags(every, "badit-nobad"), orders=[1, 2, 3])
    for m in figure4:
        cells += grid([m], seeds, "mtl", "angles", angles_flags(every, m))
    return cells


STUDIES = {"classroom": classroom_study, "superni": superni_study, "classroom-paper": classroom_paper_study,
           "superni-paper": superni_paper_study}


GRID_FLAGS = ("--out", "--resume", "--overwrite", "--method", "--seed", "--setting", "--order")  # each cell's own


def custom_study(args, train_flags) -> dict:
    if given := [f for f in GRID_FLAGS if any(a == f or a.startswith(f + "=") for a in train_flags)]:
        raise InputError(f"{', '.join(given)} after -- would override what the grid sets for each cell (its run folder "
                         f"under studies/, its method, seed, setting and order): drop {'it' if len(given) == 1 else 'them'}; "
                         f"vary methods with --methods, seeds with --seeds, orders with --orders, the place with --dir.")
    if any(a == "--eval" and b == "none" or a == "--eval=none" for a, b in zip(train_flags, train_flags[1:] + [""])):
        raise InputError("a study compares the runs' scores: drop --eval none.")
    cells = []
    variants = [("", [])]
    if args.vary:
        key, _, values = args.vary.partition("=")
        if not key or not values:
            raise InputError(f"--vary {args.vary!r}: give a train.py flag and its values, e.g. --vary lr=1e-4,2e-4.")
        variants = [(f"{key}={v}", [f"--{key}", v]) for v in names(values)]
    if args.orders and not args.continual:
        raise InputError("--orders are the continual setting's task orders: add --continual.")
    settings = ["mtl"] + ["single"] * args.single + ["continual"] * args.continual
    for (variant, flags), setting in itertools.product(variants, settings):
        orders = args.orders if setting == "continual" and args.orders else [None]
        cells += grid(args.methods, args.seeds, setting, variant, flags, orders)
    return dict(flags=train_flags, cells=cells, reference=args.reference)


# ----------------------------------------------------------------------------------------------
# Running cells


def done(cell: Cell, run: Path) -> bool:
    """Whether a cell has finished: its record is there and whole (a torn or edited one is not a finished cell)."""
    if cell.kind == "analysis":
        return (run / "conflict.csv").is_file() and (run / "coactivation.csv").is_file()
    record = run / ("metrics_base.json" if cell.kind == "base" else "metrics_test.json")
    try:
        return record.is_file() and bool(read_record(record, METRICS, "")["per_task"])
    except InputError:
        return False


def commands(cell: Cell, study: dict, work: Path, python: list) -> list[list]:
    """The command lines that run (or continue) a cell."""
    flags = study["flags"]
    if cell.kind == "base":  # the base model on the test sets, once for the whole study
        keep = {"--data": 2, "--tasks": 2, "--eval-limit": 2, "--max-len": 2, "--model": 2, "--device": 2}
        picked = [f for i, f in enumerate(flags) if f in keep or (i and flags[i - 1] in keep)]
        picked = [("--limit" if f == "--eval-limit" else f) for f in picked]
        return [[sys.executable, "eval.py", "evaluate", "--base-only", *picked, "--out", work / cell.id]]
    if cell.kind == "analysis":
        run = work / cell.of
        return [[sys.executable, "eval.py", name, run] for name in ("conflict", "coactivation")]
    out = work / cell.id
    if (out / "config.json").is_file() and progressed(out):
        return [python + ["train.py", "--out", out, "--resume"]]
    # a new cell, or one that failed before its first step: (again) with the study's current flags
    return [python + train_argv(cell, study, work)]


def train_argv(cell: Cell, study: dict, work: Path) -> list:
    order = [] if cell.order is None else ["--order", str(cell.order)]
    return ["train.py", "--out", work / cell.id, "--method", cell.method, "--seed", str(cell.seed), "--setting",
            cell.setting, *order, *study["flags"], *cell.flags]


def check_grid(study: dict, work: Path):
    """Parse every train cell's command line as train.py would (flags, data, the method's own flags), so that
    a bad flag stops the study before its first cell, not after hours of others."""
    problems = []
    for cell in study["cells"]:
        if cell.kind != "train" or done(cell, work / cell.id):
            continue
        argv = [str(a) for a in train_argv(cell, study, work)[1:]]
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                parse_args(argv)
        except SystemExit:  # argparse's error, already printed into err
            problems.append(f"{cell.id}: {err.getvalue().strip().splitlines()[-1]}")
        except InputError as e:
            problems.append(f"{cell.id}: {e}")
    if problems:
        raise InputError(f"{len(problems)} cell(s) of this study would be refused by train.py, so none was run:\n  "
                         + "\n  ".join(problems[:10]) + ("\n  ..." if len(problems) > 10 else ""))


def progress(run: Path):
    """Where a running cell is, from its newest log.jsonl: (stretch, first step, steps done, steps in all).
    A stretch is what the bar times from its first step: the run, a task of a single-task run or an
    ELREA stage (their folders), a phase of a continual run, each begun anew by a resume."""
    logs = sorted(run.glob("**/log.jsonl"), key=lambda p: p.stat().st_mtime)
    # whole lines only: train.py may be writing the last one
    lines = [json.loads(line) for line in logs[-1].read_text().split("\n")[:-1] if line.strip()] if logs else []
    starts = [i for i, e in enumerate(lines) if "total_steps" in e]
    if not starts:
        return None, 0, 0, 0
    start = lines[starts[-1]]
    steps = [e["step"] for e in lines[starts[-1]:] if "loss" in e]
    folder = logs[-1].parent.relative_to(run).as_posix()
    name = ([] if folder == "." else [folder]) + ([f"phase {start['phase'] + 1}"] if start["phase"] else [])
    return (" ".join(name), len(starts)), start["step"], (steps[-1] if steps else start["step"]), start["total_steps"]


def run_cell(cell: Cell, study: dict, work: Path, python: list, bar):
    """Run (or continue) one cell as subprocesses; their output goes to studies/<name>/logs/<cell>.out, and
    the time they take, interrupted or not, adds up in <cell>.seconds."""
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    start, spent = time.time(), logs / f"{cell.id}.seconds"
    try:
        run_commands(cell, commands(cell, study, work, python), logs, work, bar)
    finally:
        spent.write_text(str(time.time() - start + (float(spent.read_text()) if spent.is_file() else 0.0)))


def end_with_parent():
    """In the child, before it starts (Linux): a SIGTERM when the study ends, even killed hard, so that no cell runs on
    unwatched (train.py takes it as a Ctrl-C: a checkpoint, then it stops). Elsewhere: nothing."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_commands(cell: Cell, cmds: list, logs: Path, work: Path, bar):
    for cmd in cmds:
        with open(logs / f"{cell.id}.out", "a") as out:
            out.write(f"\n$ {' '.join(map(str, cmd))}\n")
            out.flush()
            # its own session: a Ctrl-C reaches the study only, which passes exactly one on (a second
            # one would stop train.py without a checkpoint)
            proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                    start_new_session=True, preexec_fn=end_with_parent)
            seen = None
            try:
                while proc.poll() is None:
                    time.sleep(1)
                    if cell.kind != "train":
                        continue
                    try:
                        stretch, first, n, total = progress(work / cell.id)
                    except FileNotFoundError:  # a checkpoint renamed into place under the glob: look again
                        continue
                    if stretch != seen:  # time the bar from where this task, phase or resume began
                        seen = stretch
                        bar.reset(total)
                        bar.initial = first
                        bar.set_description(f"{cell.id} {stretch[0]}".strip() if stretch else cell.id, refresh=False)
                    bar.n, bar.total = n, total
                    # evaluation and ELREA's feature and generation stages log no steps: say where to look
                    bar.set_postfix_str(f"steps done; see logs/{cell.id}.out" if total and n >= total else "")
            except KeyboardInterrupt:
                proc.send_signal(signal.SIGINT)  # train.py saves a checkpoint at the end of its step
                proc.wait()
                raise
        if proc.returncode != 0:
            raise RuntimeError(f"cell {cell.id} failed (exit {proc.returncode}); see {logs / (cell.id + '.out')}")


def collect(cell: Cell, work: Path, results: Path):
    """Copy a finished cell's small files to results/<name>/cells/<cell>/ (no adapters, no predictions)."""
    run, dest = work / cell.id, results / "cells" / cell.id
    dest.mkdir(parents=True, exist_ok=True)
    if cell.kind == "analysis":
        for name in ("conflict.csv", "conflict.md", "coactivation.csv", "coactivation.md"):
            shutil.copy(work / cell.of / name, dest / name)
    for name in ("config.json", "metrics_test.json", "metrics_base.json", "continual.json", "elrea.json"):
        if (run / name).is_file():
            shutil.copy(run / name, dest / name)
    for log in run.glob("**/log.jsonl"):  # the loss curve and the regroup diagnostics, per phase
        lines = read_jsonl(log)
        curve = {"loss": [e["loss"] for e in lines if "loss" in e], "regroups": [
            {"step": e["step"], **e["regroup"]} for e in lines if "regroup" in e]}
        angles = [{"phase": e["phase"], "step": e["step"], **e["angles"]} for e in lines if "angles" in e]
        if angles:  # --angles-every: the experts' gradient angles over training (means over layers)
            curve["angles"] = angles
        name = "curve.json" if log.parent == run else f"curve-{log.parent.relative_to(run).as_posix().replace('/', '-')}.json"
        (dest / name).write_text(json.dumps(curve))
    spent = work / "logs" / f"{cell.id}.seconds"
    seconds = {"seconds": float(spent.read_text())} if spent.is_file() else {}
    (dest / "cell.json").write_text(json.dumps({**asdict(cell), **seconds}, indent=1))


def study_command(keep_dir=True) -> str:
    """This study's command line, to run again (keep_dir) or as it is recorded in study.json (where its files go,
    --dir, does not change what runs)."""
    argv = sys.argv[1:]
    if "--dir" in argv and not keep_dir:
        del argv[argv.index("--dir"):argv.index("--dir") + 2]
    return "python study.py " + " ".join(shlex.quote(a) for a in argv)


def grid_record(study: dict) -> dict:
    """What makes a study's grid: its flags, reference and cells (study.json keeps it with the command)."""
    return {"flags": study["flags"], "reference": study["reference"], "cells": [asdict(c) for c in study["cells"]]}


def same_grid(saved: dict, record: dict) -> bool:
    """Whether `record` continues the study `saved` describes: the same flags and reference, and every cell it
    ran still there unchanged (a grid may grow by new cells). Where the data lies (--data's folder) is not
    part of the grid: each run checks its data's fingerprint."""
    def located(flags):
        return [("<data>" if i and flags[i - 1] == "--data" else f) for i, f in enumerate(flags)]
    cells = [asdict(Cell(**c)) for c in saved.get("cells", [])]  # fields added since take their defaults
    return (located(saved.get("flags", [])) == located(record["flags"]) and saved.get("reference") == record["reference"]
            and all(c in record["cells"] for c in cells))


def claim_study(name: str, work: Path, results: Path, record: dict, overwrite: bool):
    """Lock the study and make sure its folders are its own (files.py's rule): new, or made by study.py for
    this study, and, unless --overwrite, with the same grid.
    --overwrite empties both, the finished cells' results included. -> the lock (keep it)."""
    for folder in (work, results):
        check_writable_path(folder, "--dir")
        if contents(folder) and kind_of(folder) != "study":
            raise InputError(f"{folder} holds files that study.py did not mark as a study's (no {MARKER}, or another "
                             f"kind): they are not touched. Move them away, or choose another study name or --dir.")
        check_no_links(folder, "--dir")
    made = {folder: not folder.exists() for folder in (work, results)}
    work.mkdir(parents=True, exist_ok=True)
    lock = lock_folder(work, "study.py", "study name")
    try:
        for folder in (work, results):
            mark(folder, "study", "study.py", created=made[folder])
        saved = read_json(results / "study.json") if (results / "study.json").is_file() else None
        if saved and not same_grid(saved, record):
            if not overwrite:
                raise InputError(f"study {name!r} has run with another grid ({results / 'study.json'}): its cells would "
                                 f"mix with this one's. Give this grid a new name, or delete the old study's runs and "
                                 f"results with --overwrite.")
            for folder in (work, results):
                empty_folder(folder, "study", "--overwrite")
    except BaseException:
        if lock:
            lock.close()
        raise
    return lock


def run_study(name: str, study: dict, launcher: str, nproc: int, base: Path = ROOT, overwrite=False) -> list[str]:
    """Run (or continue) every cell, one after another, and keep the summary up to date. -> the cells that
    did not finish."""
    work, results = base / "studies" / name, base / "results" / name
    check_grid(study, work)
    lock = claim_study(name, work, results, grid_record(study), overwrite)
    try:
        return run_cells(name, study, launcher, nproc, work, results)
    finally:
        if lock:
            lock.close()


def run_cells(name: str, study: dict, launcher: str, nproc: int, work: Path, results: Path) -> list[str]:
    command = study_command()
    record = {"command": study_command(keep_dir=False), **grid_record(study), **({"notes": study["notes"]} if study.get("notes") else {})}
    atomic_write(results / "study.json", lambda f: Path(f).write_text(json.dumps(record, indent=1)))
    python = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                                 if launcher == "torchrun" else [])
    cells = study["cells"]
    overall = tqdm(total=len(cells), desc=f"study {name}", unit="cell", position=0, dynamic_ncols=True)
    inner = tqdm(total=0, desc="cell", unit="step", position=1, leave=False, dynamic_ncols=True)
    failed, timed = [], []
    for cell in cells:
        run = work / (cell.of if cell.kind == "analysis" else cell.id)
        if (results / "cells" / cell.id / "cell.json").is_file() and not (work / cell.id).exists():
            overall.update(1)  # its results are committed and its run is elsewhere (a fresh clone): kept, not rerun
            continue
        if done(cell, work / cell.id if cell.kind != "analysis" else run):
            if not (results / "cells" / cell.id / "cell.json").is_file():
                collect(cell, work, results)
            overall.update(1)
            continue
        if cell.kind == "analysis" and not done(Cell(cell.of), run):
            failed.append(f"{cell.id} (its run {cell.of} has not finished)")
            overall.update(1)
            continue
        inner.reset(total=0)
        inner.set_description(cell.id)
        try:
            run_cell(cell, study, work, python, inner)
        except RuntimeError as e:
            failed.append(str(e))
            tqdm.write(str(e))
            overall.update(1)
            continue
        collect(cell, work, results)
        timed.append(json.loads((results / "cells" / cell.id / "cell.json").read_text()).get("seconds", 0))
        overall.update(1)
        left = sum(not done(c, work / (c.of if c.kind == "analysis" else c.id)) for c in cells)
        overall.set_postfix(left=f"~{left * np.mean(timed) / 3600:.1f} h")  # from the cells timed so far
        write_summary(name, results)
    inner.close()
    overall.close()
    print(write_summary(name, results))
    if failed:
        print(f"{len(failed)} cell(s) did not finish:\n  " + "\n  ".join(failed) + f"\nrun `{command}` again to retry them.",
              file=sys.stderr)
    return failed


# ----------------------------------------------------------------------------------------------
# The summary, from results/<name>/cells/ alone


def paired_permutation_test(diffs, rounds: int = 100_000, seed: int = 0) -> float:
    """Two-sided sign-flip test of "the mean paired difference is zero": under that hypothesis each
    difference is as likely negated, so p is the share of sign flips whose |mean| reaches the observed
    |mean|. Every flip is enumerated for up to 16 pairs; otherwise `rounds` random flips (seeded)."""
    d = np.asarray(diffs, dtype=float)
    if len(d) <= 16:
        signs = np.array(list(itertools.product([1, -1], repeat=len(d))))
    else:
        signs = np.random.default_rng(seed).choice([1, -1], size=(rounds, len(d)))
    return float((np.abs((signs * d).mean(1)) >= abs(d.mean()) - 1e-12).mean())


def mean_std(values, unit="seed") -> str:
    """Mean ± sample standard deviation; a lone value says it is one `unit` (a seed, or a continual run)."""
    if not values:
        return "-"
    return f"{np.mean(values):.1f}" + (f" ± {np.std(values, ddof=1):.1f}" if len(values) > 1 else f" (1 {unit})")


DAMAGED_CELL = "restore it from git (results/ is committed), or delete the cell's folder and run the study again"


def load_cells(results: Path) -> list[dict]:
    cells = []
    for folder in sorted((results / "cells").glob("*")):
        if (folder / "cell.json").is_file():
            cell = read_json(folder / "cell.json", DAMAGED_CELL)
            for name in ("metrics_test", "metrics_base", "continual", "curve", "elrea"):
                if (folder / f"{name}.json").is_file():
                    cell[name] = read_json(folder / f"{name}.json", DAMAGED_CELL)
            cell["folder"] = folder
            cells.append(cell)
    return cells


def row_of(c: dict) -> str:
    return c["method"] + (f" [{c['variant']}]" if c["variant"] else "")


def summarise(results: Path) -> dict:
    """Everything the summary shows, as data: per row (method + variant) and seed, the scores."""
    study = read_json(results / "study.json", "restore it from git (results/ is committed), or run the study again")
    cells = load_cells(results)
    trained = [c for c in cells if c["kind"] == "train" and "metrics_test" in c]
    rows = list(dict.fromkeys(row_of(c) for c in study["cells"] if c["kind"] == "train"))
    tasks = list(dict.fromkeys(t for c in trained for t in c["metrics_test"]["per_task"]))
    out = {"command": study["command"], "reference": study["reference"], "tasks": tasks, "rows": {},
           "notes": study.get("notes", [])}
    for row in rows:
        mtl = {c["seed"]: c for c in trained if row_of(c) == row and c["setting"] == "mtl"}
        single = {c["seed"]: c for c in trained if row_of(c) == row and c["setting"] == "single"}
        if not mtl and not single:
            continue
        r = {"seeds": sorted(mtl), "per_task": {t: [mtl[s]["metrics_test"]["per_task"][t]["rougeL"] for s in sorted(mtl)
                                                     if t in mtl[s]["metrics_test"]["per_task"]] for t in tasks},
             "average": [mtl[s]["metrics_test"]["rougeL"] for s in sorted(mtl)],
             "exact_match": [mtl[s]["metrics_test"]["exact_match"] for s in sorted(mtl)],
             "task_ids_used": any(c["metrics_test"].get("task_ids_used") for c in mtl.values()),
             "seconds": [mtl[s].get("seconds") for s in sorted(mtl) if mtl[s].get("seconds")]}
        if single:
            r["single_average"] = [single[s]["metrics_test"]["rougeL"] for s in sorted(single)]
            r["colla"] = [colla(mtl[s]["metrics_test"]["rougeL"], {t: v["rougeL"] for t, v in
                                                                  single[s]["metrics_test"]["per_task"].items()})
                          for s in sorted(mtl) if s in single]
        regroups = [c["curve"]["regroups"] for c in mtl.values() if c.get("curve", {}).get("regroups")]
        if regroups:
            r["regroups"] = [{k: [g[i][k] for g in regroups] for k in regroups[0][0]} for i in range(len(regroups[0]))]
        r["curves"] = {s: mtl[s]["curve"]["loss"] for s in sorted(mtl) if "curve" in mtl[s]}
        angles = {s: mtl[s]["curve"]["angles"] for s in sorted(mtl) if "angles" in mtl[s].get("curve", {})}
        if angles:  # --angles-every: the experts' gradient angles over training, per seed
            r["angles"] = angles
        r["method"] = next(c["method"] for c in study["cells"] if c["kind"] == "train" and row_of(c) == row)
        out["rows"][row] = r
    for row, r in out["rows"].items():  # every method against the reference, every variant against its method
        ablated = [("against_badit", "badit")] if row in ABLATION and "badit" in out["rows"] else []
        for key, other in [("against_reference", study["reference"]), ("against_method", r["method"])] + ablated:
            diffs = [a - b for a, b in paired(trained, row, other, tasks)] if other != row else []
            if diffs:
                seeds = set(r["seeds"]) & set(out["rows"][other]["seeds"])
                r[key] = {"pairs": len(diffs), "seeds": len(seeds), "mean_difference": float(np.mean(diffs)),
                          "p": paired_permutation_test(diffs)}
        # the single-task runs against the reference's and badit's: the head start of a short training (colla's baseline)
        for other in dict.fromkeys([study["reference"], "badit"]):
            diffs = [a - b for a, b in paired(trained, row, other, tasks, "single")] if row not in (other, study["reference"]) else []
            if diffs:
                seeds = set.intersection(*({c["seed"] for c in trained if c["setting"] == "single" and row_of(c) == name}
                                           for name in (row, other)))
                r.setdefault("single_against", {})[other] = {
                    "pairs": len(diffs), "seeds": len(seeds), "mean_difference": float(np.mean(diffs)),
                    "p": paired_permutation_test(diffs)}
    continual = [c for c in trained if c["setting"] == "continual" and "continual" in c]
    single = {(row_of(c), c["seed"]): c for c in trained if c["setting"] == "single"}
    out["continual"] = {continual_label(c): continual_summary(c, single.get((row_of(c), c["seed"]))) for c in continual}
    out["continual_matrices"] = {continual_label(c): {"row": row_of(c), "order": c.get("order"), "seed": c["seed"],
                                                      "rougeL": c["continual"]["rougeL"]} for c in continual}
    out["continual_rows"] = continual_rows(continual, out["continual"], study["reference"])
    out["analyses"] = {}
    for c in cells:
        if c["kind"] == "analysis":
            out["analyses"][c["method"]] = read_analyses(c["folder"])
    base = [c for c in cells if c["kind"] == "base" and "metrics_base" in c]
    if base:
        out["base"] = base[0]["metrics_base"]
    return out


def paired(trained, row, reference, tasks, setting="mtl"):
    """(score, reference score) pairs over seeds x tasks: the same seed, the same task (joint runs, or single-task)."""
    ours, theirs = ({(c["seed"], t): c["metrics_test"]["per_task"][t]["rougeL"] for c in trained
                     if row_of(c) == name and c["setting"] == setting for t in tasks if t in c["metrics_test"]["per_task"]}
                    for name in (row, reference))
    return [(ours[k], theirs[k]) for k in sorted(ours) if k in theirs]


def continual_label(c: dict) -> str:
    order = c.get("order")
    return row_of(c) + f" ({'' if order is None else f'order {order}, '}seed {c['seed']})"


def continual_terms(c: dict) -> dict:
    """(order, seed, task) -> (final score a[T][i], forgetting of task i, None for the last task) of a continual cell."""
    a, order = c["continual"]["rougeL"], c["continual"]["order"]
    T = len(order)
    return {(c.get("order"), c["seed"], t): (a[-1][i], max(a[j][i] for j in range(i, T - 1)) - a[-1][i] if i < T - 1 else None)
            for i, t in enumerate(order)}


CONTINUAL_REFERENCE = "gainlora"  # the continual state of the art the paper compares with (METHOD.md section 8)
# The paper's ablation rows, each tested against the full method (badit) wherever both ran (METHOD.md section 6).
ABLATION = {"badit-nobad": "w/o BAD", "badit-noregroup": "w/o DOG", "loramoe": "w/o both"}


def continual_rows(continual: list[dict], per_cell: dict, reference: str) -> dict:
    """Per row: AP / Fgt / Fwt / Bwt over its finished continual cells (orders x seeds), and against the reference
    row (and gainlora's, where it ran) the paired test over (order, seed) x tasks of the final scores (AP's terms)
    and of forgetting (Fgt's): keys final_against_reference, forgetting_against_reference (_against_gainlora)."""
    full = [c for c in continual if "AP" in per_cell[continual_label(c)]]
    rows = {}
    for row in dict.fromkeys(row_of(c) for c in full):
        mine = [c for c in full if row_of(c) == row]
        r = {k: [per_cell[continual_label(c)][k] for c in mine if k in per_cell[continual_label(c)]]
             for k in ("AP", "Fgt", "Fwt", "Bwt")}
        r["runs"] = [continual_label(c) for c in mine]
        rows[row] = r
    for suffix, other in (("reference", reference), (CONTINUAL_REFERENCE, CONTINUAL_REFERENCE), ("badit", "badit")):
        for row, r in rows.items():
            if row in (other, reference) or other not in rows:  # (the reference against gainlora: gainlora's row, negated)
                continue
            if suffix == "badit" and row not in ABLATION:
                continue
            ours = {k: v for c in full if row_of(c) == row for k, v in continual_terms(c).items()}
            theirs = {k: v for c in full if row_of(c) == other for k, v in continual_terms(c).items()}
            shared = sorted((k for k in ours if k in theirs), key=str)
            runs = {k[:2] for k in shared}
            for i, name in ((0, "final"), (1, "forgetting")):
                diffs = [ours[k][i] - theirs[k][i] for k in shared if ours[k][i] is not None]
                if diffs:
                    r[f"{name}_against_{suffix}"] = {"pairs": len(diffs), "seeds": len(runs),
                                                     "mean_difference": float(np.mean(diffs)), "p": paired_permutation_test(diffs)}
    return rows


def continual_summary(c: dict, single: dict | None) -> dict:
    """AP / Fgt / Bwt of a continual cell; Fwt too where the same method has a single-task run at its seed."""
    a, order = c["continual"]["rougeL"], c["continual"]["order"]
    if not a or len(a) != len(a[0]):
        return {"rows": len(a)}
    per_task = single["metrics_test"]["per_task"] if single else {}
    b = [per_task[t]["rougeL"] for t in order] if all(t in per_task for t in order) else None
    return continual_metrics(a, b)


def read_analyses(folder: Path) -> dict:
    rows = [line.split(",") for line in (folder / "conflict.csv").read_text().splitlines()]
    C = np.array([[float(x) for x in r[1:]] for r in rows[1:]])
    off = C[~np.eye(len(C), dtype=bool)]
    counts = [int(line.split(",")[1]) for line in (folder / "coactivation.csv").read_text().splitlines()[1:]]
    return {"conflict_mean_cosine": float(off.mean()), "conflict_negative_share": float((off < 0).mean()),
            "coactivation": counts}


def markdown(name: str, s: dict) -> str:
    """summary.md: the joint (and single-task) rows, the continual runs, the interference analyses."""
    lines = [f"# Study `{name}`", "", f"Command: `{s['command']}`", "", *[f"Note: {n}\n" for n in s.get("notes", [])],
             "ROUGE-L x100 per task, mean ± standard deviation over seeds (sample std); "
             "a difference counts only beyond seed noise (METHOD.md section 8).", ""]
    base = s.get("base")
    if s["rows"]:
        lines += joint_lines(s)
    elif base:  # a study may run its continual cells first
        lines.append(f"Base model, average ROUGE-L {base['rougeL']:.1f}: no joint run has finished yet.")
    if s["continual"]:
        lines += continual_lines(s)
    lines += ablation_lines(s)
    if s["analyses"]:
        lines += ["", "## Interference analyses (seed 0; METHOD.md section 8)", "",
                  "| method | task-gradient cosine, mean off-diagonal | negative pairs | co-activation: blocks marked by 1, 2, ... tasks |",
                  "|---|---|---|---|"]
        for m, a in s["analyses"].items():
            lines.append(f"| {m} | {a['conflict_mean_cosine']:+.3f} | {100 * a['conflict_negative_share']:.0f} % | "
                         f"{', '.join(map(str, a['coactivation'][1:]))} |")
    if not (base or s["rows"] or s["continual"] or s["analyses"]):
        lines.append("No cell has finished yet.")
    return "\n".join(lines) + "\n"


def joint_lines(s: dict) -> list[str]:
    """The per-task table of the joint and single-task rows, their paired tests and regroup diagnostics."""
    rows, base = s["rows"], s.get("base")
    heads = list(rows)
    columns = ["task"] + (["base model"] if base else []) + heads
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for t in s["tasks"]:
        cells = [mean_std(rows[h]["per_task"].get(t, [])) for h in heads]
        lines.append(f"| {t} | " + (f"{base['per_task'][t]['rougeL']:.1f} | " if base and t in base["per_task"] else
                                   "- | " if base else "") + " | ".join(cells) + " |")
    lines.append("| **average** | " + (f"**{base['rougeL']:.1f}** | " if base else "") +
                 " | ".join(f"**{mean_std(rows[h]['average'])}**" for h in heads) + " |")
    lines.append("| exact match | " + (f"{base['exact_match']:.1f} | " if base else "") +
                 " | ".join(mean_std(rows[h]["exact_match"]) for h in heads) + " |")
    if any("colla" in r for r in rows.values()):
        lines.append("| single-task average | " + ("- | " if base else "") + " | ".join(mean_std(rows[h].get("single_average", [])) for h in heads) + " |")
        lines.append("| colla | " + ("- | " if base else "") + " | ".join(mean_std(rows[h].get("colla", [])) for h in heads) + " |")
    lines.append("| seeds | " + ("- | " if base else "") + " | ".join(str(len(rows[h]["average"])) for h in heads) + " |")
    lines.append("| minutes per run | " + ("- | " if base else "") +
                 " | ".join(f"{np.mean(rows[h]['seconds']) / 60:.1f}" if rows[h]["seconds"] else "-" for h in heads) + " |")
    if any(r["task_ids_used"] for r in rows.values()):
        lines.append("\ncgc is CGC-LoRA as implemented here; it is given each test example's task id (an oracle advantage).")
    lines += ["", f"## Against `{s['reference']}`, paired over seeds x tasks", "",
              "Sign-flip permutation test of the mean paired difference (same seed, same task); two-sided p.", "",
              "| method | pairs | mean difference | p | reading |", "|---|---|---|---|---|"]
    for h in heads:
        if "against_reference" in rows[h]:
            lines.append(paired_row(h, rows[h]["against_reference"], s["reference"]))
    variants = [h for h in heads if "against_method" in rows[h]]
    if variants:
        lines += ["", "## Each variant against its own method, paired over seeds x tasks", "",
                  "Training loss: the mean over the first and over the last quarter of the steps (seed mean).", "",
                  "| variant | pairs | mean difference | p | reading | training loss, first / last quarter |",
                  "|---|---|---|---|---|---|"]
        for h in variants:
            method = rows[h]["method"]
            lines.append(paired_row(h, rows[h]["against_method"], method) +
                         f" {quarters(rows[method])} -> {quarters(rows[h])} |")
    singles = [h for h in heads if rows[h].get("single_against")]
    if singles:
        lines += ["", "## Single-task runs (each task trained alone), paired over seeds x tasks", "",
                  "The score of each task trained alone (colla's baseline, METHOD.md section 8), against the same task "
                  "trained alone by the other method at the same seed: how fast a method learns from a short training.", "",
                  "| single-task runs | pairs | mean difference | p | reading |", "|---|---|---|---|---|"]
        for h in singles:
            for other, a in rows[h]["single_against"].items():
                lines.append(paired_row(f"{h} against {other}", a, other))
    regrouped = {h: r["regroups"] for h, r in rows.items() if r.get("regroups")}
    if regrouped:
        lines += ["", "## Regroup diagnostics (METHOD.md section 5), mean over seeds", "",
                  "| run | regroup | step | intra-expert angle before -> after | inter-expert angle before -> after | moved (total) |",
                  "|---|---|---|---|---|---|"]
        for h, groups in regrouped.items():
            for i, g in enumerate(groups):
                lines.append(f"| {h} | {i + 1} | {np.mean(g['step']):.0f} | {np.mean(g['intra_before']):.1f} -> "
                             f"{np.mean(g['intra_after']):.1f} | {np.mean(g['inter_before']):.1f} -> "
                             f"{np.mean(g['inter_after']):.1f} | {np.mean(g['moved']):.0f} |")
    return lines


def continual_lines(s: dict) -> list[str]:
    """The continual runs' AP / Fgt / Fwt / Bwt, over orders and seeds, and their paired tests."""
    lines = ["", "## Continual setting (ROUGE-L)", "",
             "Fwt against the same method's single-task run at the same seed, where there is one. Orders: 1 and 2 "
             "the benchmark's published ones (the classroom suite: listed and reversed), 3 and up seeded "
             "permutations, 0 the --seed-shuffled order of runs made before orders existed.", "",
             "| run | AP | Fgt | Fwt | Bwt |", "|---|---|---|---|---|"]
    for h, m in s["continual"].items():
        lines.append(f"| {h} | " + " | ".join(f"{m[k]:.1f}" if k in m else "-" for k in ("AP", "Fgt", "Fwt", "Bwt")) + " |")
    rows = s.get("continual_rows", {})
    if not any(len(r["AP"]) > 1 for r in rows.values()):
        return lines
    lines += ["", "Over orders and seeds: mean ± standard deviation.", "",
              "| method | runs | AP | Fgt | Fwt | Bwt |", "|---|---|---|---|---|---|"]
    for h, r in rows.items():
        lines.append(f"| {h} | {len(r['AP'])} | " + " | ".join(mean_std(r[k], "run") for k in ("AP", "Fgt", "Fwt", "Bwt")) + " |")
    for suffix, other in (("reference", s["reference"]), (CONTINUAL_REFERENCE, CONTINUAL_REFERENCE)):
        tested = [(h, r) for h, r in rows.items() if f"final_against_{suffix}" in r]
        if tested:
            lines += ["", f"Against `{other}`, paired over (order, seed) x tasks: the final score of each "
                      "task (AP's terms) and its forgetting (Fgt's terms; lower is better).", "",
                      "| method | pairs | mean difference | p | reading |", "|---|---|---|---|---|"]
        for h, r in tested:
            for key, what in ((f"final_against_{suffix}", "final score"), (f"forgetting_against_{suffix}", "forgetting")):
                if key in r:
                    lines.append(paired_row(f"{h}: {what}", r[key], other, runs="runs (order, seed)",
                                            lower_is_better=what == "forgetting"))
    return lines


def ablation_lines(s: dict) -> list[str]:
    """The paper's ablation at this study's scale: each ablated row against the full method (badit), mixed (paired
    over seeds x tasks) and sequential (over orders x tasks: final scores and forgetting)."""
    rows, continual = s["rows"], s.get("continual_rows", {})
    present = [h for h in ABLATION if "against_badit" in rows.get(h, {}) or "final_against_badit" in continual.get(h, {})]
    if not present:
        return []
    lines = ["", "## The paper's ablation, against `badit` (the full method)", "",
             "Mixed: average ROUGE-L, mean ± standard deviation over seeds, and the paired difference to badit over seeds x "
             "tasks. Sequential: AP and Fgt over orders, and the paired differences of the final scores and of the "
             "forgetting over orders x tasks (lower forgetting is better).", "",
             "| row | the paper's name | mixed | mixed vs badit (p) | sequential AP | Fgt | final vs badit (p) | forgetting vs badit (p) |",
             "|---|---|---|---|---|---|---|---|"]
    full_rows = [("badit", "full")] + [(h, ABLATION[h]) for h in present]
    for h, name in full_rows:
        r, c = rows.get(h, {}), continual.get(h, {})
        def test(a, unit):
            return f"{a['mean_difference']:+.2f} ({a['p']:.3f}, {a['seeds']} {unit}{'s' if a['seeds'] != 1 else ''})" if a else "-"

        lines.append(f"| {h} | {name} | {mean_std(r.get('average', []))} | {test(r.get('against_badit'), 'seed')} | "
                     f"{mean_std(c.get('AP', []), 'run')} | {mean_std(c.get('Fgt', []), 'run')} | "
                     f"{test(c.get('final_against_badit'), 'run')} | {test(c.get('forgetting_against_badit'), 'run')} |")
    return lines


def paired_row(row: str, a: dict, other: str, runs="seeds", lower_is_better=False) -> str:
    """The test's reading. METHOD.md section 8 calls nothing a difference under 3 seeds (or 3 continual runs over
    orders x seeds): with fewer, p measures the spread over tasks at one or two runs, not the runs' spread.
    runs: what a.seeds counts, plural first ("seeds", "runs (order, seed)"). lower_is_better: a difference
    in forgetting, where less is better."""
    if a["seeds"] < 3:
        noun, _, rest = runs.partition(" ")
        noun = noun if a["seeds"] > 1 else noun.removesuffix("s")
        reading = f"{a['seeds']} {noun}{' ' + rest if rest else ''}: an anecdote, not a comparison"
    elif a["p"] >= 0.05:
        reading = "no difference beyond seed noise"
    else:
        reading = ("better" if (a["mean_difference"] > 0) != lower_is_better else "worse") + f" than {other} (p < 0.05)"
    return f"| {row} | {a['pairs']} | {a['mean_difference']:+.2f} | {a['p']:.3f} | {reading} |"


def quarters(r: dict) -> str:
    """Mean training loss over the first and the last quarter of the steps, averaged over seeds."""
    curves = [c for c in r["curves"].values() if len(c) >= 4]
    if not curves:
        return "-"
    first = np.mean([np.mean(c[:len(c) // 4]) for c in curves])
    last = np.mean([np.mean(c[-(len(c) // 4):]) for c in curves])
    return f"{first:.3f} / {last:.3f}"


def write_summary(name: str, results: Path) -> str:
    s = summarise(results)
    text = markdown(name, s)
    atomic_write(results / "summary.md", lambda f: Path(f).write_text(text))
    atomic_write(results / "summary.json", lambda f: Path(f).write_text(json.dumps(s, indent=1)))
    plots(s, results)
    return text


def seeds_label(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def plots(s: dict, results: Path):
    """The pictures of a summary (eval.maybe_plot: only when matplotlib is installed): scores.png (each run's average
    as a point, the mean and spread of its seeds, the reference's mean marked), angles.png (regroup diagnostics),
    figure4.png (the experts' gradient angles over training, the paper's Figure 4), continual.png (each sequential
    run's accuracy matrix) and continual_average.png (the average over the tasks learned so far, after each task),
    coactivation.png."""
    rows = {h: r for h, r in s["rows"].items() if r["average"]}
    reference = s["reference"]

    def scores(ax):
        names = list(rows)[::-1]  # the first row at the top
        for y, h in enumerate(names):
            values = rows[h]["average"]
            mean = float(np.mean(values))
            spread = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            ax.errorbar(mean, y, xerr=spread, fmt="D", color="black", capsize=4, markersize=5, zorder=3)
            ax.scatter(values, [y] * len(values), color="tab:red" if h == reference else "tab:blue", alpha=0.6, zorder=2)
        if reference in rows:
            ax.axvline(float(np.mean(rows[reference]["average"])), color="tab:red", linestyle="--", linewidth=1,
                       label=f"{reference} (the reference): mean")
            ax.legend(fontsize=8, loc="lower right")
        ax.set_yticks(range(len(names)), [f"{h} ({seeds_label(len(rows[h]['average']))})" for h in names], fontsize=8)
        ax.set_xlabel("average ROUGE-L (points: seeds; diamond and bar: mean ± standard deviation)")
        ax.grid(axis="x", alpha=0.3)

    def angles(ax):
        for h, r in regrouped.items():
            for key in ("intra_after", "inter_after"):
                ax.plot([np.mean(g["step"]) for g in r["regroups"]], [np.mean(g[key]) for g in r["regroups"]],
                        marker="o", label=f"{h}: {key}")
        ax.set(xlabel="optimizer step", ylabel="degrees")
        ax.legend(fontsize=7)

    def figure4(axes):
        from eval import PAPER_ANGLES

        for ax, key in zip(axes, ("inter", "intra")):
            for h, r in with_angles.items():
                per_seed = list(r["angles"].values())
                n = min(len(a) for a in per_seed)
                values = np.array([[e[key] for e in a[:n]] for a in per_seed])  # (seeds, points)
                steps = [e["step"] for e in per_seed[0][:n]]
                line, = ax.plot(steps, values.mean(0), label=f"{h} ({seeds_label(len(per_seed))})")
                if len(per_seed) > 1:
                    ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.15)
            for level, text in PAPER_ANGLES[key]:
                ax.axhline(level, color="gray", linestyle=":", linewidth=1)
                ax.annotate(text, (0.01, level), xycoords=("axes fraction", "data"), fontsize=7, color="gray", va="bottom")
            ax.set(xlabel="optimizer step", ylabel="degrees (mean over layers; band: seeds' range)",
                   title=f"{key}-expert gradient angle")
        axes[0].legend(fontsize=7)

    matrices = s.get("continual_matrices", {})
    full = {k: m for k, m in matrices.items() if m["rougeL"] and len(m["rougeL"]) == len(m["rougeL"][0])}
    methods = list(dict.fromkeys(m["row"] for m in full.values()))
    orders = sorted({(m["order"] if m["order"] is not None else -1, m["seed"]) for m in full.values()})

    def heatmaps(axes):
        for i, (order, seed) in enumerate(orders):
            for j, method in enumerate(methods):
                ax = axes[i][j]
                m = next((m for m in full.values() if m["row"] == method and (m["order"] if m["order"] is not None
                                                                              else -1, m["seed"]) == (order, seed)), None)
                ax.set_xticks([])
                ax.set_yticks([])
                if m is None:
                    ax.axis("off")
                    continue
                image = ax.imshow(np.array(m["rougeL"]), vmin=0, vmax=100, cmap="viridis")
                ax.set_title(f"{method}, {'order ' + str(order) if order >= 0 else 'shuffled'}, seed {seed}", fontsize=8)
                if j == 0:
                    ax.set_ylabel("after task t", fontsize=7)
                if i == len(orders) - 1:
                    ax.set_xlabel("score on task i", fontsize=7)
        axes[0][-1].figure.colorbar(image, ax=axes, shrink=0.6, label="ROUGE-L")

    def averages(ax):
        for method in methods:
            curves = np.array([[np.mean(row[:t + 1]) for t, row in enumerate(m["rougeL"])]
                               for m in full.values() if m["row"] == method])  # (runs, tasks)
            x = np.arange(1, curves.shape[1] + 1)
            line, = ax.plot(x, curves.mean(0), marker="o", markersize=3, label=f"{method} ({len(curves)} runs)")
            if len(curves) > 1:
                ax.fill_between(x, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.12)
        ax.set(xlabel="tasks trained", ylabel="average ROUGE-L over the tasks learned so far",
               title="sequential setting: mean over orders (band: their range)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)

    def coactivation(ax):
        width = 0.8 / len(s["analyses"])
        for i, (m, a) in enumerate(s["analyses"].items()):
            counts = a["coactivation"][1:]
            ax.bar(np.arange(1, len(counts) + 1) + i * width, counts, width, label=m)
        ax.set(xlabel="tasks marking the block", ylabel="blocks")
        ax.legend(fontsize=7)

    if rows:
        maybe_plot(results / "scores", scores, size=(8, 1.2 + 0.4 * len(rows)))
    regrouped = {h: r for h, r in rows.items() if r.get("regroups")}
    if regrouped:
        maybe_plot(results / "angles", angles)
    with_angles = {h: r for h, r in rows.items() if r.get("angles")}
    if with_angles:
        maybe_plot(results / "figure4", figure4, panels=2)
    if full:
        maybe_plot(results / "continual", heatmaps, grid=(len(orders), len(methods)),
                   size=(2.6 * len(methods) + 1, 2.6 * len(orders)))
        maybe_plot(results / "continual_average", averages, size=(8, 5))
    if s["analyses"]:
        maybe_plot(results / "coactivation", coactivation)


# ----------------------------------------------------------------------------------------------
# Command line


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help=f"a named study ({', '.join(STUDIES)}) or the name of a custom grid (--methods ...)")
    p.add_argument("--summary", action="store_true", help="only rewrite and print the summary of the finished cells")
    g = p.add_argument_group("a custom grid (train.py flags after --)")
    g.add_argument("--methods", type=names, help=f"comma-separated, from {', '.join(ALL)}")
    g.add_argument("--seeds", type=lambda t: [int(s) for s in names(t)], default=[0, 1, 2], help="default: 0,1,2")
    g.add_argument("--single", action="store_true", help="also the single-task runs of every method (colla)")
    g.add_argument("--continual", action="store_true", help="also the continual setting")
    g.add_argument("--orders", type=lambda t: [int(o) for o in names(t)], help="continual: the task orders, varied like "
                   "seeds (train.py --order), e.g. 1,2,3 (default: train.py's, order 1)")
    g.add_argument("--vary", help="one train.py flag over values, e.g. lr=1e-4,2e-4,5e-4: a row per value")
    g.add_argument("--reference", default="lora", help="the method the others are tested against (default: lora)")
    g = p.add_argument_group("running")
    g.add_argument("--launcher", choices=["python", "torchrun"], default="python", help="torchrun: each cell data-parallel")
    g.add_argument("--nproc", type=positive_int, default=1, help="processes per cell with --launcher torchrun")
    g.add_argument("--dir", type=Path, default=ROOT, help="where studies/ (the runs) and results/ (what is kept) go "
                   "(default: the repository)")
    g.add_argument("--overwrite", action="store_true", help="a study of this name ran with another grid: delete its "
                   "runs (studies/<name>/) and results (results/<name>/), which study.py made, and start again")
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:split])
    train_flags = argv[split + 1:]

    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", args.name) or ".." in args.name:
        raise InputError(f"study name {args.name!r}: a name, not a path (letters, digits, '_', '-', '.'); it names "
                         f"studies/<name>/ and results/<name>/ under --dir, which says where they go.")
    results = args.dir / "results" / args.name
    if args.summary:
        if not (results / "study.json").is_file():
            raise InputError(f"{results / 'study.json'} is missing: study {args.name!r} has not run yet.")
        print(write_summary(args.name, results))
        return
    if args.name in STUDIES:
        if args.methods or train_flags:
            raise InputError(f"{args.name!r} is a named study with a fixed configuration; give a new name for a custom grid.")
        study = STUDIES[args.name]()
    elif args.methods:
        unknown = sorted(set(args.methods) - set(ALL))
        if unknown:
            raise InputError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(ALL)}.")
        study = custom_study(args, train_flags)
    else:
        raise InputError(f"{args.name!r} is not a named study ({', '.join(STUDIES)}); for a custom grid give --methods.")
    # SIGTERM, and SIGINT even where the shell ignores it (nohup ... &), stop like Ctrl-C: the cell checkpoints
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    try:
        failed = run_study(args.name, study, args.launcher, args.nproc, args.dir, args.overwrite)
    except KeyboardInterrupt:
        print(f"\ninterrupted: run `{study_command()}` again to continue.", file=sys.stderr)
        sys.exit(130)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    command(main)
