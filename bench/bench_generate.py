"""Loader and greedy generation: ours against Hugging Face transformers on the demo model, in float32 and
in bf16 (bf16 weights; ours autocasts itself, HF's generate runs under the same torch.autocast).

A batch of SuperNI test prompts (left-padded), --new-tokens new tokens with EOS ignored, so both produce
exactly that many tokens per row. Prints load time, tokens/s, their ratios, the achieved matmul FLOP
rate as a fraction of the peak a large matmul of the same dtype reaches in this process, and whether
both produced the same tokens (in float32 they must; bf16 rounding may flip a near-tie). Also prints
how much of the evaluation's prefill is padding: eval.py sorts SuperNI's test prompts by length
before cutting them into batches.

    python bench/bench_generate.py [--batch 8] [--new-tokens 50] [--repeats 3] [--dtypes float32,bfloat16] [--device cpu] [--compile]

Target: ours >= 1.2x HF's tokens/s in both precisions.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]
from bench_train import DEFAULT_DATA, matmul_peak  # noqa: E402
from conftest import left_pad, superni_prompts  # noqa: E402
from data import collate, encode_examples, list_tasks, load_tasks  # noqa: E402
from hf import load_model, load_tokenizer, read_model_args  # noqa: E402
from model import generate  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def generation_flops(cfg, lengths, new_tokens) -> float:
    """The matmul FLOPs greedy decoding must do, the same for both sides: the prefill of each row's real
    tokens (causal attention, the vocabulary projection at its last token), then one position per row
    and step attending to the row's tokens so far. Padding is not counted: work on it is waste."""
    d, h, kv, hd, f = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim
    linear = cfg.n_layers * (d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f)
    head = d * cfg.vocab_size
    flops = 0
    for n in lengths:
        flops += 2 * n * linear + cfg.n_layers * 2 * h * n * n * hd + 2 * head
        flops += sum(2 * (linear + head) + cfg.n_layers * 4 * h * (n + t) * hd for t in range(1, new_tokens))
    return flops


def prefill_padding(tok, data, batch_size=64, eval_limit=20, max_len=512) -> float:
    """Share of the prefill positions that are padding when eval.py runs SuperNI's test sets."""
    tasks = load_tasks(data, list_tasks(data), "test", eval_limit)
    examples = sorted(encode_examples(tok, tasks, [t.name for t in tasks], max_len, train=False), key=lambda e: -len(e.prompt_ids))
    real = padded = 0
    for s in range(0, len(examples), batch_size):
        x = collate(examples[s:s + batch_size], tok.pad_token_id)
        real, padded = real + int(x["mask"].sum()), padded + x["mask"].numel()
    return 1 - real / padded


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "checkpoints" / "SmolLM2-135M-Instruct"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3, help="generation runs per side; the best is reported")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", default=DEFAULT_DATA, help="a SuperNI root (default: --data superni's cache, else the team's copy beside the repository)")
    p.add_argument("--compile", action="store_true", help="also time ours with torch.compile'd decoder layers "
                   "(compiled in an untimed first run)")
    args = p.parse_args()
    device = torch.device(args.device)
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(args.model)
    ids, mask = left_pad([tok.encode(t) for t in superni_prompts(args.data)[:args.batch]], tok.pad_token_id)
    lengths = mask.sum(1).tolist()
    ids, mask = ids.to(device), mask.to(device)
    cfg = read_model_args(args.model)
    print(f"batch {tuple(ids.shape)} ({int(mask.sum())} prompt tokens), {args.new_tokens} new tokens, "
          f"{args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"prefill padding of SuperNI's test sets in eval.py's batches of 64 (20 per task, max 512 tokens): "
          f"{100 * prefill_padding(tok, args.data):.1f} %")
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        ours, ours_load = timed(lambda: load_model(args.model, device=device, dtype=dtype))
        hf, hf_load = timed(lambda: AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval())
        hf.generation_config.eos_token_id = None  # run all steps, like ours with eos_token_id=None

        def run_ours():
            return generate(ours, ids, mask, max_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=tok.pad_token_id)

        def run_hf():
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                return hf.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False,
                                   pad_token_id=tok.pad_token_id)

        def run_compiled():
            return generate(compiled, ids, mask, max_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=tok.pad_token_id)

        if args.compile:
            compiled = load_model(args.model, device=device, dtype=dtype)
            compiled.compile_layers()
            out_compiled, compile_time = timed(run_compiled)

        times = {"ours": [], "hf": []} | ({"compiled": []} if args.compile else {})
        for _ in range(args.repeats):  # alternate, so all see the same machine state
            out_ours, t = timed(run_ours)
            times["ours"].append(t)
            out_hf, t = timed(run_hf)
            times["hf"].append(t)
            if args.compile:
                out_compiled, t = timed(run_compiled)
                times["compiled"].append(t)
        n_new = args.batch * args.new_tokens
        tps = {k: n_new / min(v) for k, v in times.items()}
        peak = matmul_peak(dtype, device)
        flops = generation_flops(cfg, lengths, args.new_tokens)
        print(f"{name:8s} load      ours {ours_load:6.2f} s   hf {hf_load:6.2f} s   ratio (hf/ours) {hf_load / ours_load:5.2f}x")
        print(f"{name:8s} generate  ours {tps['ours']:6.1f} tok/s  hf {tps['hf']:6.1f} tok/s  ratio (ours/hf) "
              f"{tps['ours'] / tps['hf']:5.2f}x  (target >= 1.2x)")
        print(f"{name:8s} matmul    ours {flops / min(times['ours']) / 1e9:6.1f} GFLOP/s = "
              f"{100 * flops / min(times['ours']) / peak:4.1f} %, hf {100 * flops / min(times['hf']) / peak:4.1f} % of the "
              f"measured {peak / 1e9:.0f} GFLOP/s peak")
        if args.compile:
            print(f"{name:8s} compiled  {tps['compiled']:6.1f} tok/s, {tps['compiled'] / tps['ours']:5.2f}x eager's, "
                  f"{tps['compiled'] / tps['hf']:5.2f}x hf's (first run, compiling: {compile_time:.1f} s); same tokens as "
                  f"eager: {torch.equal(out_compiled, out_ours)}")
        new = slice(ids.shape[1], None)
        print(f"{name:8s} same tokens as hf: {torch.equal(out_ours, out_hf)} "
              f"({(out_ours[:, new] == out_hf[:, new]).float().mean().item():.1%} of the new tokens)")


if __name__ == "__main__":
    main()
