"""Loader and greedy generation: ours against Hugging Face transformers on the demo model.

CPU, float32, a batch of 8 SuperNI prompts (left-padded), 50 new tokens, EOS ignored so both
produce exactly 50 tokens per row. Prints load time, tokens/s and their ratios, and checks
that both produced the same tokens.

    python bench/bench_generate.py [--model checkpoints/SmolLM2-135M-Instruct] [--repeats 3]
"""

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from conftest import left_pad, superni_prompts  # noqa: E402
from model import generate, load_model, load_tokenizer  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "checkpoints" / "SmolLM2-135M-Instruct"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3, help="generation runs per side; the best is reported")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(args.model)
    ids, mask = left_pad([tok.encode(t) for t in superni_prompts(args.batch)], tok.pad_token_id)
    print(f"batch {tuple(ids.shape)} ({int(mask.sum())} prompt tokens), {args.new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")

    ours, ours_load = timed(lambda: load_model(args.model, device="cpu", dtype=torch.float32))
    hf, hf_load = timed(lambda: AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval())
    hf.generation_config.eos_token_id = None  # run all steps, like ours with eos_token_id=None

    def run_ours():
        return generate(ours, ids, mask, max_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=tok.pad_token_id)

    def run_hf():
        with torch.no_grad():
            return hf.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False,
                               pad_token_id=tok.pad_token_id)

    times = {"ours": [], "hf": []}
    for _ in range(args.repeats):  # alternate, so both see the same machine state
        out_ours, t = timed(run_ours)
        times["ours"].append(t)
        out_hf, t = timed(run_hf)
        times["hf"].append(t)
    n_new = args.batch * args.new_tokens
    tps = {k: n_new / min(v) for k, v in times.items()}
    print(f"load      ours {ours_load:6.2f} s   hf {hf_load:6.2f} s   ratio (hf/ours) {hf_load / ours_load:5.2f}x")
    print(f"generate  ours {tps['ours']:6.1f} tok/s  hf {tps['hf']:6.1f} tok/s  ratio (ours/hf) {tps['ours'] / tps['hf']:5.2f}x  (target >= 1.0x)")
    same = torch.equal(out_ours, out_hf)
    print(f"same tokens as hf: {same}")


if __name__ == "__main__":
    main()
