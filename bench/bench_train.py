"""Full training steps on the demo model with SuperNI batches: ours against HF transformers + PEFT, in
float32 and in bf16, each figure also as a fraction of the machine's measured matmul peak.

Each side runs in its own process (so peak memory is its own): the same global batches from data.py
(SuperNI training instances of every task, the prompt of METHOD.md section 7, answer + EOS, --max-len, plain shuffling),
AdamW, gradient clipping 1.0, dropout 0.05, LoRA of rank K r = 24 on gate_proj, and the same
precision on both sides: float32, or bf16 weights with torch.autocast (CUDA, or a CPU with native bf16)
and float32 adapters. A step is forward + loss on the answer tokens + backward + clip + optimizer step.
Ours is train.py's step (logits only where the loss needs them); PEFT's is `model(..., labels=...)`.
Also timed: our BADIT (K = 6, r = 4) step.

    python bench/bench_train.py [--max-len 256] [--batch-size 8] [--steps 5] [--dtypes float32,bfloat16] [--compile]

Per side: tokens/s, peak memory, and the achieved matmul FLOP rate against the peak that a large
matmul of the same dtype reaches in the same process. The FLOPs are those a step must do, counted the
same for every side: the linears, causal attention and adapters over the batch's real tokens, forward
and the backward to the inputs (the base weights are frozen), and the vocabulary projection at the answer
tokens only; real tokens only: work on padding is waste. Targets: ours / PEFT >= 1.3x tokens/s and
<= 1.0x peak memory in both precisions;
BADIT / LoRA step time <= 1.10. Peak memory is CUDA's max_memory_allocated on a GPU; on the CPU the
resident set's peak during the warm-up and timed steps above its level before the first (sampled every
2 ms): what training needs beyond the loaded model (memory freed after a step stays resident, so the
level after warm-up would hide it). On a GPU use --warmup 10 --steps 30: every new batch shape first
builds its attention plan.
"""

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data import SUPERNI, answer_loss, batch_order, collate, encode_examples, load_tasks, superni_cache  # noqa: E402
from hf import load_model, load_tokenizer, read_model_args  # noqa: E402

# the benchmark: the cache (python data.py --download superni), else our machines' shared copy
DEFAULT_DATA = SUPERNI if superni_cache().is_dir() else str(ROOT.parent / "shared" / "data" / "superni")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakRSS:
    """Highest resident set size seen while the block runs, sampled by a thread."""

    def __enter__(self):
        self.peak, self.running = rss_bytes(), True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def matmul_peak(dtype, device, repeats=10) -> float:
    """FLOP/s of the best of `repeats` square matmuls: this machine's practical peak (a GPU needs 8192 to fill it)."""
    size = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(size, size, dtype=dtype, device=device), torch.randn(size, size, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def step_flops(cfg, x, rank=24) -> float:
    """The matmul FLOPs a training step must do (see the module docstring), forward and backward."""
    lengths = x["mask"].sum(1)
    T = int(lengths.sum())
    d, h, kv, hd, f = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim
    linear = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f  # q, k, v, o, gate, up, down
    attention = 2 * h * int((lengths * lengths).sum()) * hd  # causal: half of 4 h n^2 hd per row
    forward = cfg.n_layers * (2 * T * linear + attention + 2 * T * rank * (d + f))
    loss_tokens = int(x["answer"].sum())
    head = 2 * loss_tokens * d * cfg.vocab_size
    return 2 * (forward + head)  # backward to the inputs costs what the forward costs (frozen weights)


def batches(tok, args, device):
    tasks = load_tasks(args.data, None, "train", limit=args.batch_size * (args.steps + args.warmup))
    examples = encode_examples(tok, tasks, [t.name for t in tasks], args.max_len, seed=0)
    order = batch_order(examples, args.batch_size, seed=0, epoch=0)[:args.steps + args.warmup]
    return [collate([examples[i] for i in b], tok.pad_token_id, device) for b in order]


def peft_step(model, x):
    labels = x["ids"].masked_fill(x["answer"] == 0, -100)
    positions = (x["mask"].cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=x["ids"], attention_mask=x["mask"], position_ids=positions, labels=labels).loss


def run_side(args):
    """One side in this process -> JSON line with seconds per step, tokens/s, FLOP rate and peak memory."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    bf16 = dtype == torch.bfloat16
    tok = load_tokenizer(args.model)
    data = batches(tok, args, device)
    if args.side == "peft":
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device)
        # PEFT scales by lora_alpha / r: 192 / 24 = 8, our alpha / r = 32 / 4 (METHOD.md section 6)
        model = get_peft_model(model, LoraConfig(r=24, lora_alpha=192, lora_dropout=0.05, target_modules=["gate_proj"]))

        def step(x):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):  # the same autocast as ours
                return peft_step(model, x)
    else:
        from methods import add_adapters

        method, _, compiled = args.side.partition("+")
        model = load_model(args.model, device=device, dtype=dtype)  # bf16 weights: our forward autocasts itself
        add_adapters(model, method, num_experts=6, rank=4, alpha=32, dropout=0.05)
        if compiled:
            model.compile_layers()  # compiled in the warm-up steps (their shapes' graphs), timed after

        def step(x):
            return answer_loss(model, x) / x["answer"].sum()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in params), "adapters must be float32"
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)

    def one(x):
        step(x).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    peak_flops = matmul_peak(dtype, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = rss_bytes()  # the loaded model, adapters and optimizer: the peak is what the steps add to it
    times, tokens, flops = [], 0, 0.0
    cfg = read_model_args(args.model)
    with PeakRSS() as peak:
        for x in data[:args.warmup]:
            one(x)
        for x in data[args.warmup:]:
            start = time.perf_counter()
            one(x)
            times.append(time.perf_counter() - start)
            tokens += int(x["mask"].sum())
            flops += step_flops(cfg, x)
    memory = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak.peak - base
    print(json.dumps(dict(side=args.side, dtype=args.dtype, seconds=sum(times), steps=len(times), tokens=tokens,
                          tokens_per_s=tokens / sum(times), flops_per_s=flops / sum(times), peak_flops=peak_flops,
                          peak_memory=memory)))


SIDES = ("lora", "peft", "badit", "lora+compile", "badit+compile")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "checkpoints" / "SmolLM2-135M-Instruct"))
    p.add_argument("--data", default=DEFAULT_DATA, help="a SuperNI root (default: --data superni's cache, else the team's copy beside the repository)")
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps per side (after --warmup steps)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    p.add_argument("--compile", action="store_true", help="also time our lora and badit steps with "
                   "torch.compile'd decoder layers (train.py --compile), against eager")
    p.add_argument("--sides", help="comma-separated: which of lora, peft, badit (and with --compile lora+compile, "
                   "badit+compile) to time (default: all; at 8B, where a side takes a minute to load, fewer)")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        return run_side(args)

    print(f"{Path(args.model).name}, SuperNI batches of {args.batch_size}, max length {args.max_len}, {args.steps} timed steps "
          f"after {args.warmup}, {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    sides = [s for s in SIDES if (args.compile or "+" not in s) and (not args.sides or s in args.sides.split(","))]
    for dtype in args.dtypes.split(","):
        results = {}
        for side in sides:
            cmd = [sys.executable, __file__, "--side", side, "--dtype", dtype] + sys.argv[1:]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            r = results[side] = json.loads(out.strip().splitlines()[-1])
            print(f"{dtype:8s} {side:13s} {r['tokens_per_s']:7.1f} tokens/s  {r['seconds'] / r['steps']:5.2f} s/step  "
                  f"peak memory {r['peak_memory'] / 2**20:7.1f} MiB  matmul {r['flops_per_s'] / 1e9:6.1f} GFLOP/s = "
                  f"{100 * r['flops_per_s'] / r['peak_flops']:4.1f} % of the measured {r['peak_flops'] / 1e9:.0f} GFLOP/s peak")
        ours, peft = results.get("lora"), results.get("peft")
        if ours and peft:
            print(f"{dtype:8s} ours / PEFT LoRA tokens/s:    {ours['tokens_per_s'] / peft['tokens_per_s']:.2f}x (target >= 1.3)")
            print(f"{dtype:8s} ours / PEFT LoRA peak memory: {ours['peak_memory'] / peft['peak_memory']:.2f}x (target <= 1.0)")
        if ours and "badit" in results:
            print(f"{dtype:8s} BADIT / LoRA step time:        {ours['tokens_per_s'] / results['badit']['tokens_per_s']:.3f} (target <= 1.10)")
        for side in ("lora", "badit"):
            fast, eager = results.get(f"{side}+compile"), results.get(side)
            if fast and eager:
                print(f"{dtype:8s} {side} compiled / eager tokens/s: {fast['tokens_per_s'] / eager['tokens_per_s']:.2f}x, "
                      f"peak memory {fast['peak_memory'] / eager['peak_memory']:.2f}x"
                      + (f"; compiled / PEFT tokens/s {fast['tokens_per_s'] / peft['tokens_per_s']:.2f}x, peak memory "
                         f"{fast['peak_memory'] / peft['peak_memory']:.2f}x" if peft else ""))


if __name__ == "__main__":
    main()
