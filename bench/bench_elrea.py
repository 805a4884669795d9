"""ELREA's cost against LoRA's on the same data: total training time and evaluation time as ratios (the
thesis reports about 2.3x for both at C = 4), and the throughput of the gradient-feature stage.

Both run through the command lines users run: `train.py --eval none` (the training time, ELREA's four
stages included), then `eval.py evaluate` (the evaluation time, ELREA's query features and its
(C + 1) x B-row decoding included). Each in its own process, one after the other.

    python bench/bench_elrea.py [--data classroom] [--tasks ...] [--limit N] [--epochs E] [--clusters C]
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="classroom")
    p.add_argument("--tasks", help="comma-separated (default: every task of --data)")
    p.add_argument("--limit", help="training instances per task (default: all)")
    p.add_argument("--eval-limit", help="test instances per task (default: all)")
    p.add_argument("--epochs", help="default: train.py's recipe")
    p.add_argument("--clusters", default="4", help="ELREA's clusters (default: 4, as the figure in ELREA's thesis)")
    args = p.parse_args()
    flags = ["--data", args.data] + [x for k in ("tasks", "limit", "epochs") if getattr(args, k)
                                     for x in (f"--{k}", getattr(args, k))]
    eval_flags = ["--limit", args.eval_limit] if args.eval_limit else []
    work = Path(tempfile.mkdtemp(prefix="bench_elrea."))
    try:
        seconds = {}
        for method in ("lora", "elrea"):
            run = work / method
            extra = ["--clusters", args.clusters] if method == "elrea" else []
            seconds[method] = (timed(["train.py", "--method", method, "--out", run, "--eval", "none", *flags, *extra]),
                               timed(["eval.py", "evaluate", run, *eval_flags]))
            print(f"{method:5s} training {seconds[method][0]:7.1f} s   evaluation {seconds[method][1]:6.1f} s")
        record = json.loads((work / "elrea" / "elrea.json").read_text())
        print(f"elrea / lora: training {seconds['elrea'][0] / seconds['lora'][0]:.2f}x, evaluation "
              f"{seconds['elrea'][1] / seconds['lora'][1]:.2f}x (ELREA's thesis: about 2.3x for both at C = 4)")
        print(f"elrea: {record['clusters']} clusters {record['sizes']} (asked for {args.clusters}); gradient features "
              f"{record['features_per_second']:.1f} examples/s ({record['proj_dim']} dimensions, "
              f"{len(record['snapshots'])} epoch ends); stage seconds " +
              ", ".join(f"{k} {v:.0f}" for k, v in record["seconds"].items()))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
