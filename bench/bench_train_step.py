"""Training steps on the demo model: BADIT against LoRA, and our LoRA against HF transformers + PEFT.

One batch of 8 SuperNI training instances (prompt + answer + EOS, prompts shortened from the left
to --max-len tokens, left-padded), float32 on the CPU, AdamW, dropout 0.05, targets gate_proj.
Loss on the answer and EOS only. A step is forward + backward + optimizer step.

    python bench/bench_train_step.py [--max-len 256] [--steps 3]

Prints: BADIT (K=6, r=4) / LoRA (rank 24) step-time ratio (target <= 1.10), and our LoRA's
tokens/s / PEFT LoRA's on the same model and batch (target >= 1.3).
"""

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from badit import add_adapters  # noqa: E402
from conftest import SUPERNI  # noqa: E402
from data import format_prompt, read_task  # noqa: E402
from model import load_model, load_tokenizer  # noqa: E402


def superni_batch(tok, n, max_len):
    """ids, attention mask, prompt mask, answer mask (B, L), left-padded."""
    rows = []
    for task in sorted(p.name for p in SUPERNI.iterdir())[:n]:
        definition, instances = read_task(SUPERNI, task, "train")
        prompt = tok.encode(format_prompt(definition, instances[0]["input"]))
        answer = tok.encode(instances[0]["output"][0])[:50] + [tok.eos_token_id]
        prompt = prompt[-(max_len - len(answer)):]
        rows.append((prompt, answer))
    L = max(len(p) + len(a) for p, a in rows)
    ids, mask, prompt_mask, answer_mask = (torch.zeros(n, L, dtype=torch.long) for _ in range(4))
    for b, (p, a) in enumerate(rows):
        seq = p + a
        ids[b, L - len(seq):] = torch.tensor(seq)
        mask[b, L - len(seq):] = 1
        prompt_mask[b, L - len(seq):L - len(a)] = 1
        answer_mask[b, L - len(a):] = 1
    ids[mask == 0] = tok.pad_token_id
    return ids, mask, prompt_mask, answer_mask


def ours_step(model, opt, batch):
    ids, mask, prompt_mask, answer_mask = batch
    predicts = answer_mask[:, 1:].bool()  # position t predicts token t + 1
    at = torch.cat([predicts, torch.zeros_like(predicts[:, :1])], 1)
    logits = model(ids, mask, route_mask=prompt_mask, logits_at=at)  # (n_answer, vocab)
    F.cross_entropy(logits.float(), ids[:, 1:][predicts]).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def hf_step(model, opt, batch):
    ids, mask, _, answer_mask = batch
    labels = ids.masked_fill(answer_mask == 0, -100)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    model(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def seconds_per_step(runs, steps):
    """runs: name -> step function; alternated step by step; best of `steps` after one warm-up."""
    times = {name: [] for name in runs}
    for i in range(steps + 1):
        for name, step in runs.items():
            start = time.perf_counter()
            step()
            if i:
                times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "checkpoints" / "SmolLM2-135M-Instruct"))
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    tok = load_tokenizer(args.model)
    batch = superni_batch(tok, 8, args.max_len)
    tokens = int(batch[1].sum())
    print(f"batch {tuple(batch[0].shape)}, {tokens} tokens, {int(batch[3].sum())} answer tokens, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")

    base = load_model(args.model, device="cpu", dtype=torch.float32)
    models = {}
    for method in ("lora", "badit"):
        models[method] = copy.deepcopy(base).train()
        add_adapters(models[method], method, num_experts=6, rank=4, alpha=32, dropout=0.05)
    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    hf = get_peft_model(hf, LoraConfig(r=24, lora_alpha=32, lora_dropout=0.05, target_modules=["gate_proj"])).train()

    def adamw(m):
        return torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=2e-4, weight_decay=0.0)

    opts = {name: adamw(m) for name, m in {**models, "peft": hf}.items()}
    t = seconds_per_step({
        "lora": lambda: ours_step(models["lora"], opts["lora"], batch),
        "badit": lambda: ours_step(models["badit"], opts["badit"], batch),
        "peft": lambda: hf_step(hf, opts["peft"], batch),
    }, args.steps)
    for name, s in t.items():
        print(f"{name:6s} {s:6.3f} s/step  {tokens / s:8.1f} tokens/s")
    print(f"BADIT / LoRA step time: {t['badit'] / t['lora']:.3f} (target <= 1.10)")
    print(f"our LoRA / PEFT LoRA tokens/s: {t['peft'] / t['lora']:.2f}x (target >= 1.3)")


if __name__ == "__main__":
    main()
