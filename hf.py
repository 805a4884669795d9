"""The Hugging Face side of model.py: a checkpoint folder or hub id in, a Transformer and a tokenizer out.

    load_model(path, device=None, dtype=None) -> Transformer      path: a folder or a hub id (org/name)
    load_tokenizer(path) -> Tokenizer
    check_checkpoint(path) -> ModelArgs      the config and every tensor's name and shape, from the headers only
    save_model(model, out_dir, source)       a Hugging Face checkpoint (eval.py export --merged)

config.json is translated into model.py's ModelArgs (model_args), the safetensors files are read and
checked against the model's parameters, the tokenizer is the checkpoint's tokenizer.json (the tokenizers
library), and the device and precision are chosen here (METHOD.md section 8).

    python hf.py --model PATH --prompt TEXT      greedy generation with any supported checkpoint
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import sys
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from checks import InputError, MissingFile, command, positive_int
from data import format_prompt
from files import NUMBER, atomic_write, check_record, read_json, read_record, write_json
from model import ModelArgs, Transformer, generate, rope_frequencies

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2")
DEMO_MODEL = Path(__file__).resolve().parent / "checkpoints" / "SmolLM2-135M-Instruct"  # scripts/prepare_smollm2.py


# ----------------------------------------------------------------------------------------------
# config.json -> ModelArgs


NONE = type(None)
MODEL_CONFIG = {"hidden_size?": int, "num_attention_heads?": int, "num_hidden_layers?": int, "intermediate_size?": int,
                "vocab_size?": int, "num_key_value_heads?": (int, NONE), "max_position_embeddings?": (int, NONE),
                "rms_norm_eps?": NUMBER, "head_dim?": (int, NONE), "sliding_window?": (int, NONE),
                "rope_theta?": NUMBER, "rope_parameters?": (dict, NONE), "rope_scaling?": (dict, NONE),
                "layer_types?": ([str], NONE), "tie_word_embeddings?": bool}  # the types of the fields model_args reads


def model_args(cfg: dict, source: str = "config.json") -> ModelArgs:
    """Translate a Hugging Face config.json (old `rope_scaling` or new `rope_parameters`)."""
    check_record(cfg, MODEL_CONFIG, source, "fix the file, or re-download the checkpoint")
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError(
            f"{source}: model_type {model_type!r} is not supported; "
            f"supported types: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )

    def need(key):
        if key not in cfg:
            raise InputError(f"{source}: field {key!r} is missing; it is needed for a {model_type} model.")
        return cfg[key]

    dim, n_heads, n_layers = need("hidden_size"), need("num_attention_heads"), need("num_hidden_layers")
    rope = dict(cfg.get("rope_parameters") or {})
    rope_theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    rope.update(cfg.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise InputError(f"{source}: rope type {rope_type!r} is not supported (default, linear, llama3).")
    rope_scaling = None if rope_type == "default" else {**rope, "rope_type": rope_type}

    sliding_window = cfg.get("sliding_window")
    layer_types = cfg.get("layer_types")
    if model_type in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
        sliding_window = None
    if layer_types is None:  # older configs: derive what transformers derives
        if model_type == "gemma2":
            layer_types = ["sliding_attention" if i % 2 == 0 else "full" for i in range(n_layers)]
        elif model_type in ("qwen2", "qwen3"):
            first = cfg.get("max_window_layers", n_layers)
            layer_types = ["sliding_attention" if i >= first else "full" for i in range(n_layers)]
        else:  # mistral: every layer when a window is set; llama: none
            layer_types = ["sliding_attention" if model_type == "mistral" else "full"] * n_layers
    sliding_layers = [sliding_window is not None and t == "sliding_attention" for t in layer_types]

    gemma = model_type == "gemma2"
    head_dim = cfg.get("head_dim") or dim // n_heads
    attention_bias = cfg.get("attention_bias", False)
    return ModelArgs(
        model_type=model_type,
        vocab_size=need("vocab_size"),
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        head_dim=head_dim,
        hidden_dim=need("intermediate_size"),
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        tie_embeddings=cfg.get("tie_word_embeddings", gemma),
        activation=(cfg.get("hidden_activation") if gemma else None) or cfg.get("hidden_act", "silu"),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=model_type != "qwen2" and attention_bias,
        mlp_bias=cfg.get("mlp_bias", False),
        qk_norm=model_type == "qwen3",
        attn_scale=cfg["query_pre_attn_scalar"] ** -0.5 if gemma else None,
        sliding_window=sliding_window,
        sliding_layers=sliding_layers,
        gemma_norms=gemma,
        embed_scale=gemma,
        attn_softcap=cfg.get("attn_logit_softcapping") if gemma else None,
        final_softcap=cfg.get("final_logit_softcapping") if gemma else None,
        max_positions=cfg.get("max_position_embeddings"),
    )



# ----------------------------------------------------------------------------------------------
# Loading checkpoints




HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "*.safetensors",
             "model.safetensors.index.json"]


def checkpoint_dir(path) -> Path:
    """A checkpoint folder: a local path, or a Hugging Face hub id (org/name) that is not a local folder,
    whose config, tokenizer and safetensors files are downloaded into the standard HF cache."""
    if Path(path).is_dir():
        return Path(path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) and not str(path).startswith("."):
        return _hub_snapshot(str(path))
    raise MissingFile(
        f"model folder {path} does not exist: pass a Hugging Face checkpoint folder (config.json, *.safetensors, "
        f"tokenizer.json), a hub id such as Qwen/Qwen3-0.6B, or run `python scripts/prepare_smollm2.py` for the demo model."
    )


HUB_TIMEOUT = float(os.environ.get("BADIT_HUB_TIMEOUT", 30))  # seconds to wait for the hub's first answer


def answers(repo_id: str) -> bool:
    """Whether the hub answers a question about repo_id within HUB_TIMEOUT (any answer, a refusal included, or no
    network at all, which the cache then serves); False only when the server is reached but stays silent."""
    from huggingface_hub import HfApi, constants

    print(f"looking up {repo_id} on the Hugging Face hub ({constants.ENDPOINT}; waiting at most {HUB_TIMEOUT} s) ...",
          file=sys.stderr)
    try:
        HfApi().model_info(repo_id, timeout=HUB_TIMEOUT)
    except Exception as e:  # the hub's client raises httpx or requests errors, depending on its version
        return "Timeout" not in type(e).__name__
    return True


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if not constants.HF_HUB_OFFLINE and not answers(repo_id):  # a server that never answers: the cache, or a clear error
        try:
            return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
        except LocalEntryNotFoundError:
            raise MissingFile(f"{repo_id}: the Hugging Face hub ({constants.ENDPOINT}) did not answer within {HUB_TIMEOUT} s, "
                              f"and the model is not in the cache {constants.HF_HUB_CACHE}: check the network (or "
                              f"HF_ENDPOINT), or pass a local checkpoint folder.") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))  # with the hub's progress bars
    except LocalEntryNotFoundError:
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise MissingFile(f"{repo_id} is not a local folder and is not in the Hugging Face cache {constants.HF_HUB_CACHE}, "
                          f"and the hub cannot be reached{offline}: download it on a machine with internet access "
                          f"(or unset HF_HUB_OFFLINE), or pass a local checkpoint folder.") from None
    except HfHubHTTPError as e:
        raise MissingFile(f"{repo_id} is not a local folder, and the Hugging Face hub refused it ({str(e).splitlines()[0]}): "
                          f"check the id, or log in (`hf auth login`) for a gated model.") from None


def model_fingerprint(path) -> dict:
    """{file name: sha256 prefix} of every file of a checkpoint folder (weights, config, tokenizer): a run records it,
    and --resume refuses a model whose weights or configuration changed since. Each file's hash is cached by path,
    size and modification time ($BADIT_CACHE/fingerprints.json), so a large model is hashed once."""
    import hashlib
    import os

    folder = checkpoint_dir(path)
    cache_file = Path(os.environ.get("BADIT_CACHE") or Path.home() / ".cache" / "badit") / "fingerprints.json"
    try:
        cache = json.loads(cache_file.read_text())
        cache = cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        cache = {}
    out, changed = {}, False
    for file in sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")):
        stat, key = file.stat(), str(file.resolve())
        seen = cache.get(key)
        if isinstance(seen, list) and seen[:2] == [stat.st_size, stat.st_mtime_ns]:
            out[file.name] = seen[2]
            continue
        with open(file, "rb") as f:
            out[file.name] = hashlib.file_digest(f, "sha256").hexdigest()[:16]
        cache[key], changed = [stat.st_size, stat.st_mtime_ns, out[file.name]], True
    if changed:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            write_json(cache_file, cache)
        except OSError:  # a read-only home: the hashes are computed again next time
            pass
    return out


def read_model_args(path) -> ModelArgs:
    file = checkpoint_dir(path) / "config.json"
    if not file.is_file():
        raise MissingFile(f"{file} is missing: a checkpoint folder needs the config.json it was saved with.")
    return model_args(read_json(file), str(file))


def _checkpoint_files(path: Path) -> list[Path]:
    if (path / "model.safetensors.index.json").is_file():
        index = read_record(path / "model.safetensors.index.json", {"weight_map": dict}, "re-download the checkpoint")
        weight_map = index["weight_map"]
        if not all(isinstance(v, str) for v in weight_map.values()):
            raise InputError(f"{path / 'model.safetensors.index.json'}: weight_map must map tensor names to file names; "
                             f"re-download the checkpoint.")
        files = [path / name for name in sorted(set(weight_map.values()))]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif (path / "pytorch_model.bin").is_file():
        return [path / "pytorch_model.bin"]
    else:
        raise MissingFile(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin.")
    for file in files:
        if not file.is_file():
            raise MissingFile(f"{file} is missing (listed in model.safetensors.index.json).")
    return files


def _checkpoint_tensors(path: Path, shapes_only=False):
    """Yield (file, name, tensor) one at a time, so that only one tensor is in flight; with shapes_only,
    (file, name, shape) from the safetensors headers, reading no weights."""
    from safetensors import SafetensorError, safe_open

    for file in _checkpoint_files(path):
        if file.suffix == ".bin":  # weights_only: never unpickle arbitrary objects
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            for name in list(state):
                tensor = state.pop(name)
                yield file, name, tuple(tensor.shape) if shapes_only else tensor
            return
        try:
            f = safe_open(file, framework="pt")
        except (SafetensorError, OSError) as e:
            raise InputError(f"{file}: cannot be read as safetensors ({e}): the file is incomplete or damaged; "
                             f"re-download the checkpoint.") from None
        with f:
            for key in f.keys():
                yield file, key, tuple(f.get_slice(key).get_shape()) if shapes_only else f.get_tensor(key)


def _checked_name(args: ModelArgs, expected: dict, file, key, shape) -> str | None:
    """Our parameter name for checkpoint tensor `key`, or None for one we derive; refuses a stranger or a wrong shape."""
    name = key.removeprefix("model.")
    if name.endswith("rotary_emb.inv_freq") or (args.tie_embeddings and name == "lm_head.weight"):
        return None  # derived from the config (old Llama checkpoints store it) / tied to the embeddings
    if name not in expected:
        raise InputError(f"{file}: unexpected tensor {key!r}: a {args.model_type} model with this config.json has no such weight.")
    if tuple(shape) != tuple(expected[name].shape):
        raise InputError(f"{file}: tensor {key!r} has shape {tuple(shape)}, but config.json implies "
                         f"{tuple(expected[name].shape)}; do config.json and the weights come from the same checkpoint?")
    return name


def check_checkpoint(path) -> ModelArgs:
    """config.json and every tensor's name and shape (from the files' headers, no weights read), so that a run
    can refuse a broken checkpoint before it writes anything. -> the model's ModelArgs."""
    path = checkpoint_dir(path)
    args = read_model_args(path)
    with torch.device("meta"):
        expected = dict(Transformer(args).named_parameters())  # a tied lm_head appears once, as embed_tokens
    found = {_checked_name(args, expected, *t) for t in _checkpoint_tensors(path, shapes_only=True)}
    missing = sorted(set(expected) - found)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise InputError(f"{path}: the checkpoint lacks tensors {', '.join(missing[:5])}{more}.")
    return args


def hf_name(name: str) -> str:
    """A checkpoint's name of our parameter or module `name`: ours drop Hugging Face's leading "model."."""
    return name if name.startswith("lm_head") else "model." + name


CHECKPOINT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "chat_template.jinja")


def save_model(model, out_dir, source):
    """Write the model as a Hugging Face checkpoint folder: model.safetensors under the checkpoint's names (a
    tied lm_head once, as the embeddings), and config, generation config and tokenizer files copied from
    `source`, the checkpoint it was loaded from (its torch_dtype set to the weights' dtype)."""
    source, out = checkpoint_dir(source), Path(out_dir)
    tensors = {hf_name(n): p.detach().contiguous().cpu() for n, p in model.named_parameters()}  # tied: embed_tokens only
    atomic_write(out / "model.safetensors", lambda f: save_file(tensors, f, metadata={"format": "pt"}))
    for name in CHECKPOINT_FILES[1:]:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    write_json(out / "config.json", {**read_json(source / "config.json"), "torch_dtype": dtype})


def resolve_device(name=None) -> torch.device:
    """--device: cpu, cuda or cuda:N (default: cuda when available), checked before any work starts. A GPU
    always gets its index (cuda means cuda:0): torch.cuda.set_device refuses a bare "cuda"."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA device is available (torch {torch.__version__}); use --device cpu.")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise InputError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"--device {name}: only cpu and cuda are supported.")
    return torch.device("cuda", device.index or 0) if device.type == "cuda" else device


def native_bf16(device: torch.device) -> str | None:
    """What gives this device native bf16 matrix instructions, as torch reports it, or None (then bf16
    is emulated and slower than float32). Never guessed from a CPU's model name."""
    if device.type == "cuda":
        return "CUDA" if torch.cuda.is_bf16_supported() else None
    cpu = torch.cpu
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "AMX"
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "AVX512-BF16"
    if platform.machine().lower() in ("arm64", "aarch64") and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "Arm BF16"  # oneDNN's check is native on Arm; on x86 it also accepts AVX512 without BF16
    return None


def choose_dtype(device: torch.device, requested: str | None = None) -> tuple[str, str]:
    """METHOD.md section 8's precision: (dtype name, why). bfloat16 weights + autocast where the device has
    native bf16 matrix instructions, float32 elsewhere; requested ("float32" / "bfloat16") wins."""
    native = native_bf16(device)
    if requested:
        note = "" if requested == "float32" or native else " (emulated on this CPU: slower than float32)"
        return requested, f"{'bf16' if requested == 'bfloat16' else 'float32'}: requested with --dtype{note}"
    if native:
        return "bfloat16", f"bf16: native on this {'GPU' if device.type == 'cuda' else 'CPU'} ({native}); --dtype float32 to change"
    return "float32", f"float32: no native bf16 on this {device.type.upper()}; --dtype bfloat16 to change"


def load_model(path, device=None, dtype=None) -> Transformer:
    """Build the model on the meta device, then put each checkpoint tensor in place in turn.

    device: default CUDA when available; dtype (torch.dtype or name): default choose_dtype's, bfloat16
    where the device has native bf16 (the forward then runs under autocast), float32 elsewhere.
    """
    path = checkpoint_dir(path)
    args = check_checkpoint(path)
    device = resolve_device(device)
    dtype = getattr(torch, dtype or choose_dtype(device)[0]) if not isinstance(dtype, torch.dtype) else dtype
    with torch.device("meta"):
        model = Transformer(args)
    expected = dict(model.named_parameters())
    for file, key, tensor in _checkpoint_tensors(path):
        name = _checked_name(args, expected, file, key, tensor.shape)
        if name is None:
            continue
        module_name, _, leaf = name.rpartition(".")
        param = nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=expected[name].requires_grad)
        if not torch.isfinite(param).all():  # found here, not as a NaN loss blamed on the learning rate
            raise InputError(f"{file}: the base model's tensor {key!r} holds NaN or infinite values (read as "
                             f"{str(dtype).removeprefix('torch.')}): the checkpoint is damaged; re-download it.")
        setattr(model.get_submodule(module_name), leaf, param)
    if args.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_frequencies(args).to(device)  # was built on the meta device
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Tokenizer


TOKEN = (str, dict, NONE)  # a special token: its text, or {"content": text, ...}
TOKEN_IDS = (int, [int], NONE)
TOKENIZER_RECORDS = {  # the fields the tokenizer reads, and their types
    "tokenizer_config.json": {"bos_token?": TOKEN, "eos_token?": TOKEN, "pad_token?": TOKEN},
    "generation_config.json": {"bos_token_id?": TOKEN_IDS, "eos_token_id?": TOKEN_IDS, "pad_token_id?": TOKEN_IDS},
    "config.json": {"bos_token_id?": TOKEN_IDS, "eos_token_id?": TOKEN_IDS, "pad_token_id?": TOKEN_IDS,
                    "vocab_size?": int},
}


class Tokenizer:
    """tokenizer.json through the `tokenizers` package, with special ids resolved as HF does.

    BOS around an encoded text: as transformers 5 does, tokenizer.json's own post-processor decides
    (Llama-3's and Gemma-2's add BOS, Qwen's and SmolLM's do not). eos_token_id is the tokenizer's EOS (the
    training target's end); stop_token_ids adds generation_config.json's EOS ids, which instruct
    models often extend (Llama-3's <|eot_id|>), and is what generation stops on.
    """

    def __init__(self, path):
        from tokenizers import Tokenizer as HFTokenizer

        path = checkpoint_dir(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise MissingFile(f"{file} is missing: badit reads the fast-tokenizer file tokenizer.json that HF checkpoints ship.")
        try:
            self.tk = HFTokenizer.from_file(str(file))
        except Exception as e:
            raise InputError(f"{file}: cannot be read by the tokenizers package ({e}).") from None
        def optional(name):  # a record of the checkpoint, checked by schema (TOKENIZER_RECORDS) where it is read
            file = path / name
            return read_record(file, TOKENIZER_RECORDS[name], "fix the file, or re-download the checkpoint") if file.is_file() else {}

        tok_cfg, gen_cfg, cfg = optional("tokenizer_config.json"), optional("generation_config.json"), optional("config.json")

        def token_id(key):  # tokenizer_config.json names the token; the configs give ids
            token = tok_cfg.get(key)
            token = token.get("content") if isinstance(token, dict) else token
            if token is not None and self.tk.token_to_id(token) is not None:
                return self.tk.token_to_id(token)
            ids = gen_cfg.get(key + "_id", cfg.get(key + "_id"))
            return ids[0] if isinstance(ids, list) else ids

        self.bos_token_id = token_id("bos_token")
        self.eos_token_id = token_id("eos_token")
        if self.eos_token_id is None:
            raise InputError(f"{path}: no EOS token in tokenizer_config.json, generation_config.json or config.json.")
        pad = token_id("pad_token")
        self.pad_token_id = self.eos_token_id if pad is None else pad
        gen_eos = gen_cfg.get("eos_token_id", cfg.get("eos_token_id"))
        gen_eos = gen_eos if isinstance(gen_eos, list) else [] if gen_eos is None else [gen_eos]
        self.stop_token_ids = list(dict.fromkeys([self.eos_token_id, *gen_eos]))
        if cfg.get("vocab_size") and self.tk.get_vocab_size(with_added_tokens=True) > cfg["vocab_size"]:
            raise InputError(f"{file} has {self.tk.get_vocab_size(with_added_tokens=True)} tokens, more than the "
                             f"vocab_size {cfg['vocab_size']} of {path / 'config.json'}: the tokenizer does not belong "
                             f"to this checkpoint; use the tokenizer it was trained with.")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tk.encode(text, add_special_tokens=add_special_tokens).ids  # BOS where the post-processor adds it

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """(start, end) character span of each token of text, without special tokens."""
        return self.tk.encode(text, add_special_tokens=False).offsets

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)


def load_tokenizer(path) -> Tokenizer:
    return Tokenizer(path)


# ----------------------------------------------------------------------------------------------
# Command line: greedy generation from a checkpoint, on a SuperNI-style prompt by default


def main(argv=None):
    import argparse

    example = format_prompt(
        "In this task, you are given a movie review. Classify its sentiment as \"positive\" or \"negative\".",
        "The plot was thin, but the acting was wonderful and I left the cinema smiling.",
    )
    p = argparse.ArgumentParser(description="Greedy generation with a checkpoint (the demo model by default).")
    p.add_argument("--model", default=str(DEMO_MODEL), help="Hugging Face checkpoint folder or hub id (default: the demo model)")
    p.add_argument("--prompt", default=example, help="prompt text (default: a SuperNI-style example)")
    p.add_argument("--max-new-tokens", type=positive_int, default=50)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 where the device has native bf16 "
                   "(CUDA, AVX512-BF16, AMX), float32 elsewhere")
    args = p.parse_args(argv)
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype), load_tokenizer(args.model)
    ids = torch.tensor([tok.encode(args.prompt)], device=model.lm_head.weight.device)
    out = generate(model, ids, max_new_tokens=args.max_new_tokens, eos_token_id=tok.stop_token_ids, pad_token_id=tok.pad_token_id)
    print(args.prompt + tok.decode(out[0, ids.shape[1]:].tolist()))


if __name__ == "__main__":
    command(main)
