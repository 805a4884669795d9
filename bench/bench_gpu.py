"""A GPU session's measurements in one command: a GPU is often lent for minutes, so everything is prepared and
tried on the CPU first (--tiny), then run once on the GPU.

    python bench/bench_gpu.py --out DIR                    # on a GPU: every stage below, in this order
    python bench/bench_gpu.py --out DIR --tiny             # the same stages at tiny shapes on the CPU (the tests run it)

Stages, most wanted first; each runs as its own process, its output in DIR/<stage>.log, and one stops being
started once --budget seconds are spent (a stage already running is given what is left):
  cuda-tests      python -m pytest -m cuda: every CUDA test
  train-demo      bench/bench_train.py at the demo model's shape, bf16, --warmup 10 --steps 30, eager and --compile,
                  against transformers + PEFT
  job-eager       python train.py (the main job: BADIT on the classroom suite), eager, then compiled (job-compile)
  train-1b        bench_train.py at Llama-3.2-1B's shape (random weights), as train-demo
  profile-1b      torch.profiler over compiled lora steps at 1B: the top kernels and the launches a step makes
  generate-1b     bench/bench_generate.py at 1B, bf16, eager and compiled, against transformers
  generate-demo   bench_generate.py at the demo's shape
  train-8b        bench_train.py at Llama-3.1-8B's shape: lora, peft and lora+compile (each side loads 16 GB)
DIR/summary.md gathers each stage's result lines as it ends. The demo model is checkpoints/SmolLM2-135M-Instruct when
it is there, else random weights of its shape with its tokenizer (--tokenizer-from): the job's time is then real and
its scores are not. Random-weight checkpoints go to --work (default: a temporary folder).
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "checkpoints" / "SmolLM2-135M-Instruct"
# the lines of a stage's output that say its result (the rest is progress)
RESULT_WORDS = ("passed", "failed", "skipped", "error", "tokens/s", "x (target", "step time", "compiled", "same tokens", "done in",
                "| **average**", "torch.compile:", "launches", "Self CUDA", "GPU busy", "ratio", "load ")


def stages(args, work: Path) -> list[tuple[str, list]]:
    """(name, command) in the order they run; a command that needs a checkpoint names the shape to make."""
    py = sys.executable
    tiny = args.tiny
    timing = ["--warmup", "1", "--steps", "1"] if tiny else ["--warmup", "10", "--steps", "30"]
    common = ["--dtypes", "bfloat16" if not tiny else "float32", "--data", str(args.data)]
    gen = ["--repeats", "1", "--new-tokens", "4", "--batch", "2"] if tiny else []
    job = ["--limit", "4", "--epochs", "1", "--eval-limit", "2", "--max-new-tokens", "4", "--tasks",
           "sort_ascending,copy_words"] if tiny else []
    demo, big, biggest = ("tiny", "tiny", "tiny") if tiny else ("demo", "1b", "8b")
    compiled = [] if tiny else ["--compile"]  # compiling takes minutes on a CPU: tests/test_compile.py covers it there
    all_stages = [
        ("cuda-tests", [py, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider"]),
        ("train-demo", [py, "bench/bench_train.py", "--model", demo, *timing, *common, *compiled]),
        ("job-eager", [py, "train.py", "--model", demo, "--out", work / "job-eager", *job]),
        ("job-compile", [py, "train.py", "--model", demo, "--out", work / "job-compile", "--compile", *job]),
        ("train-1b", [py, "bench/bench_train.py", "--model", big, *timing, *common, *compiled]),
        ("profile-1b", [py, __file__, "--profile", big, "--data", str(args.data), *(["--tiny"] if tiny else [])]),
        ("generate-1b", [py, "bench/bench_generate.py", "--model", big, *common, *compiled, *gen]),
        ("generate-demo", [py, "bench/bench_generate.py", "--model", demo, *common, *compiled, *gen]),
        ("train-8b", [py, "bench/bench_train.py", "--model", biggest, *timing, *common, *compiled, "--sides",
                      "lora,peft" + ("" if tiny else ",lora+compile")]),
    ]
    return [(name, cmd) for name, cmd in all_stages if not (tiny and name == "job-compile")]


def checkpoint(shape: str, args, work: Path) -> Path:
    """The folder of a model of this shape: the demo model itself where it is prepared, else random weights."""
    if shape == "demo" and (DEMO / "model.safetensors").is_file():
        return DEMO
    folder = work / f"random-{shape}"
    if not (folder / "config.json").is_file():
        subprocess.run([sys.executable, "scripts/random_checkpoint.py", shape, folder, "--tokenizer-from",
                        args.tokenizer_from], cwd=ROOT, check=True)
    return folder


def profile(args):
    """--profile SHAPE: compiled lora training steps under torch.profiler; prints the top kernels by device time,
    the kernel launches per step and how busy the device was."""
    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from methods import add_adapters
    from bench_train import batches
    from data import answer_loss
    from hf import load_model, load_tokenizer

    work = Path(args.work)
    model_dir = checkpoint(args.profile, args, work)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bench_args = argparse.Namespace(data=str(args.data), batch_size=8, steps=3, warmup=5 if not args.tiny else 1,
                                    max_len=256)
    data = batches(load_tokenizer(model_dir), bench_args, device)
    model = load_model(model_dir, device=device, dtype=dtype)
    add_adapters(model, "lora", num_experts=8, rank=4, alpha=32, dropout=0.05)
    if not args.tiny:
        model.compile_layers()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)

    def step(x):
        (answer_loss(model, x) / x["answer"].sum()).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for x in data[:bench_args.warmup]:
        step(x)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        for x in data[bench_args.warmup:]:
            step(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    wall = time.perf_counter() - start
    steps = len(data) - bench_args.warmup
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25))
    if device.type == "cuda":
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.device_time for e in kernels) / 1e6  # seconds (overlaps counted twice: an upper bound)
        print(f"launches: {len(kernels) / steps:.0f} kernels a step; GPU busy {busy / steps * 1e3:.1f} of "
              f"{wall / steps * 1e3:.1f} ms a step ({100 * busy / wall:.0f} %)")
    else:
        print(f"launches: the CPU runs no kernels ({wall / steps * 1e3:.1f} ms a step)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="the folder for the stages' logs and summary.md (new or empty)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, one step, float32, nothing compiled: the CPU's "
                   "end-to-end check of the script")
    p.add_argument("--budget", type=float, default=540, help="seconds after which no further stage starts; the running "
                   "one is stopped there too (default: %(default)s, a 10-minute call's worth with room to spare)")
    p.add_argument("--only", help="comma-separated stage names to run (default: all)")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "superni",
                   help="a SuperNI root for the benchmarks' batches (default: --data superni's cache, else the team's copy beside the repository)")
    p.add_argument("--tokenizer-from", type=Path, default=DEMO, help="a folder with the demo model's tokenizer.json and "
                   "config.json, for random-weight checkpoints (default: the demo model's folder)")
    p.add_argument("--work", type=Path, help="where random checkpoints and the jobs' runs go (default: a temporary folder)")
    p.add_argument("--profile", help=argparse.SUPPRESS)  # a stage of this script: see profile()
    args = p.parse_args(argv)
    if args.profile:
        return profile(args)
    if args.out is None:
        p.error("--out DIR is needed: the stages' logs and summary.md go there.")
    if args.out.exists() and any(args.out.iterdir()):
        p.error(f"--out {args.out} is not empty; give a new folder (this script never replaces files).")
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_gpu."))
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    summary = args.out / "summary.md"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    summary.write_text(f"# bench_gpu.py on {device}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}\n")
    wanted = args.only.split(",") if args.only else None
    for name, cmd in stages(args, work):
        if wanted and name not in wanted:
            continue
        left = args.budget - (time.time() - start)
        if left < 10:
            with open(summary, "a") as f:
                f.write(f"\n## {name}: not run (the budget of {args.budget:.0f} s was spent)\n")
            continue
        cmd = [str(c) for c in cmd]
        for i, c in enumerate(cmd):  # a shape name after --model or --profile: its checkpoint
            if i and cmd[i - 1] in ("--model", "--profile") and c in ("tiny", "demo", "1b", "8b"):
                cmd[i] = str(checkpoint(c, args, work)) if cmd[i - 1] == "--model" else c
        if name == "profile-1b":
            cmd += ["--work", str(work), "--tokenizer-from", str(args.tokenizer_from)]
        t0 = time.time()
        with open(args.out / f"{name}.log", "w") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            try:
                rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=left).returncode
            except subprocess.TimeoutExpired:
                rc = "stopped at the budget"
        lines = [line.rstrip() for line in (args.out / f"{name}.log").read_text(errors="replace").splitlines()[1:]
                 if any(w in line for w in RESULT_WORDS) and "\r" not in line and "it/s" not in line]
        with open(summary, "a") as f:
            f.write(f"\n## {name}: exit {rc}, {time.time() - t0:.0f} s\n```\n" + "\n".join(lines[-40:]) + "\n```\n")
        print(f"{name}: exit {rc}, {time.time() - t0:.0f} s", flush=True)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)  # the temporary folder this run made
    print(summary.read_text())


if __name__ == "__main__":
    main()
