"""Full training steps on the demo model with SuperNI batches: ours against HF transformers + PEFT.

Each side runs in its own process (so peak memory is its own): the same global batches from
data.py (SuperNI training instances of every task, SPEC prompt, answer + EOS, --max-len), AdamW,
gradient clipping 1.0, dropout 0.05, LoRA of rank K r = 24 on gate_proj (alpha 32), float32 on the
CPU or bfloat16 autocast on CUDA. A step is forward + loss on the answer tokens + backward + clip +
optimizer step. Ours is train.py's step (logits only where the loss needs them); PEFT's is
`model(..., labels=...)` with -100 outside the answer. Also timed: our BADIT (K=6, r=4) step.

    python bench/bench_train.py [--max-len 256] [--batch-size 8] [--steps 5] [--device cpu]

Prints tokens/s and peak memory per side and the ratios. Targets: ours / PEFT >= 1.3x tokens/s,
<= 1.0x peak memory; BADIT / LoRA step time <= 1.10. Peak memory is CUDA's max_memory_allocated on a
GPU; on the CPU it is the resident set's peak during the steps above its level before the first
step (sampled every 2 ms), the working memory of training beyond the loaded model.
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
from data import batch_order, collate, encode_examples, load_tasks  # noqa: E402
from model import load_model, load_tokenizer  # noqa: E402
from train import answer_loss  # noqa: E402

SUPERNI = ROOT.parent / "shared" / "data" / "superni"


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


def batches(tok, args, device):
    tasks = load_tasks(args.data, None, "train", limit=args.batch_size * (args.steps + args.warmup))
    examples = encode_examples(tok, tasks, [t.name for t in tasks], args.max_len, seed=0)
    order = batch_order(examples, args.batch_size, seed=0, epoch=0)[:args.steps + args.warmup]
    return [collate([examples[i] for i in b], tok.pad_token_id, device) for b in order]


def ours_step(model, x):
    return answer_loss(model, x) / x["answer"].sum()


def peft_step(model, x):
    labels = x["ids"].masked_fill(x["answer"] == 0, -100)
    positions = (x["mask"].cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=x["ids"], attention_mask=x["mask"], position_ids=positions, labels=labels).loss


def run_side(args):
    """One side in this process -> JSON line with seconds per step, tokens/s and peak memory."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    tok = load_tokenizer(args.model)
    data = batches(tok, args, device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.side == "peft":
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device)
        model = get_peft_model(model, LoraConfig(r=24, lora_alpha=32, lora_dropout=0.05, target_modules=["gate_proj"]))
        step = peft_step
    else:
        from badit import add_adapters

        model = load_model(args.model, device=device, dtype=dtype)
        add_adapters(model, args.side, num_experts=6, rank=4, alpha=32, dropout=0.05)
        step = ours_step
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)

    def one(x):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = step(model, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    for x in data[:args.warmup]:
        one(x)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = rss_bytes()
    times, tokens = [], 0
    with PeakRSS() as peak:
        for x in data[args.warmup:]:
            start = time.perf_counter()
            one(x)
            times.append(time.perf_counter() - start)
            tokens += int(x["mask"].sum())
    memory = torch.cuda.max_memory_allocated() if cuda else peak.peak - base
    print(json.dumps(dict(side=args.side, seconds=sum(times), steps=len(times), tokens=tokens,
                          tokens_per_s=tokens / sum(times), peak_memory=memory)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "checkpoints" / "SmolLM2-135M-Instruct"))
    p.add_argument("--data", default=str(SUPERNI))
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps per side (after --warmup steps)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--side", choices=["lora", "badit", "peft"], help=argparse.SUPPRESS)  # a child process
    args = p.parse_args()
    if args.side:
        return run_side(args)

    print(f"demo model, SuperNI batches of {args.batch_size}, max length {args.max_len}, {args.steps} timed steps "
          f"after {args.warmup}, {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    results = {}
    for side in ("lora", "peft", "badit"):
        cmd = [sys.executable, __file__, "--side", side] + sys.argv[1:]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        results[side] = r
        print(f"{side:6s} {r['tokens_per_s']:8.1f} tokens/s  {r['seconds'] / r['steps']:6.2f} s/step  "
              f"peak memory {r['peak_memory'] / 2**20:8.1f} MiB")
    ours, peft = results["lora"], results["peft"]
    print(f"ours / PEFT LoRA tokens/s:   {ours['tokens_per_s'] / peft['tokens_per_s']:.2f}x (target >= 1.3)")
    print(f"ours / PEFT LoRA peak memory: {ours['peak_memory'] / peft['peak_memory']:.2f}x (target <= 1.0)")
    print(f"BADIT / LoRA step time:       {results['lora']['tokens_per_s'] / results['badit']['tokens_per_s']:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
