"""Write a random-weight checkpoint of a real model's shape, for benchmarks at the sizes people fine-tune.

The speed of a training step or of decoding depends on the shapes, not on the weights' values, so
bench/bench_train.py and bench/bench_generate.py can measure Llama-3.2-1B- or Llama-3.1-8B-sized work
without the real checkpoints (which this machine cannot download); `demo` is the demo model's shape (for a
machine without the demo model), `tiny` a few layers for tests. The folder is a Hugging Face-style
Llama checkpoint (config.json, bf16 model.safetensors) that both model.py and transformers load, with
the demo model's tokenizer (49,152 tokens, inside the 128,256-token vocabulary).

    python scripts/random_checkpoint.py 8b /tmp/llama-8b             # also: 1b, demo (SmolLM2-135M's), tiny
    python bench/bench_train.py --model /tmp/llama-8b --dtypes bfloat16 --warmup 10 --steps 30
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # config.json fields of the released models (Llama-3.2-1B ties its embeddings)
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,  # the CPU tests'
                 num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, vocab_size=49152),
    "demo": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,  # SmolLM2-135M
                 num_key_value_heads=3, head_dim=64, tie_word_embeddings=True, vocab_size=49152, rope_theta=100000.0),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}


def random_weights(cfg: dict, device) -> dict[str, torch.Tensor]:
    """Normal(0, 0.02) matrices and unit norms under Hugging Face's Llama names, in bf16."""
    g = torch.Generator(device).manual_seed(0)
    d, f, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def matrix(rows, cols):
        return (0.02 * torch.randn(rows, cols, device=device, generator=g)).to(torch.bfloat16).cpu()

    ones = lambda: torch.ones(d, dtype=torch.bfloat16)  # noqa: E731
    weights = {"model.embed_tokens.weight": matrix(cfg["vocab_size"], d), "model.norm.weight": ones()}
    if not cfg["tie_word_embeddings"]:
        weights["lm_head.weight"] = matrix(cfg["vocab_size"], d)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights |= {p + "self_attn.q_proj.weight": matrix(q, d), p + "self_attn.k_proj.weight": matrix(kv, d),
                    p + "self_attn.v_proj.weight": matrix(kv, d), p + "self_attn.o_proj.weight": matrix(d, q),
                    p + "mlp.gate_proj.weight": matrix(f, d), p + "mlp.up_proj.weight": matrix(f, d),
                    p + "mlp.down_proj.weight": matrix(d, f),
                    p + "input_layernorm.weight": ones(), p + "post_attention_layernorm.weight": ones()}
    return weights


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("out", type=Path, help="the folder to write")
    p.add_argument("--tokenizer-from", type=Path, default=ROOT / "checkpoints" / "SmolLM2-135M-Instruct",
                   help="a checkpoint folder whose tokenizer and config.json fields to reuse (default: the demo model)")
    args = p.parse_args()
    if not (args.tokenizer_from / "tokenizer.json").is_file():
        sys.exit(f"{args.tokenizer_from}: no tokenizer.json. Run scripts/prepare_smollm2.py or pass --tokenizer-from.")
    cfg = json.loads((args.tokenizer_from / "config.json").read_text())
    cfg.update({"vocab_size": 128256, "rope_theta": 500000.0, **SHAPES[args.shape], "torch_dtype": "bfloat16"})
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(args.tokenizer_from / name, args.out / name)
    weights = random_weights(cfg, "cuda" if torch.cuda.is_available() else "cpu")
    save_file(weights, args.out / "model.safetensors", metadata={"format": "pt"})
    (args.out / "config.json").write_text(json.dumps(cfg, indent=2))  # last: a folder with it is complete
    print(f"{args.out}: {sum(t.numel() for t in weights.values()) / 1e9:.2f} B parameters of {args.shape}'s shape")


if __name__ == "__main__":
    main()
