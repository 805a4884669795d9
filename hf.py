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

import platform
import re
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from checks import InputError, MissingFile, command, positive_int
from data import format_prompt
from files import atomic_write, read_json, write_json
from model import ModelArgs, Transformer, generate, rope_frequencies

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2")
DEMO_MODEL = Path(__file__).resolve().parent / "checkpoints" / "SmolLM2-135M-Instruct"  # scripts/prepare_smollm2.py


# ----------------------------------------------------------------------------------------------
# config.json -> ModelArgs


def model_args(cfg: dict, source: str = "config.json") -> ModelArgs:
    """Translate a Hugging Face config.json (old `rope_scaling` or new `rope_parameters`)."""
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


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

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


def read_model_args(path) -> ModelArgs:
    file = checkpoint_dir(path) / "config.json"
    if not file.is_file():
        raise MissingFile(f"{file} is missing: a checkpoint folder needs the config.json it was saved with.")
    return model_args(read_json(file), str(file))


def _checkpoint_files(path: Path) -> list[Path]:
    if (path / "model.safetensors.index.json").is_file():
        weight_map = read_json(path / "model.safetensors.index.json")["weight_map"]
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
        setattr(model.get_submodule(module_name), leaf, param)
    if args.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_frequencies(args).to(device)  # was built on the meta device
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Tokenizer


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
        optional = lambda name: read_json(path / name) if (path / name).is_file() else {}  # noqa: E731
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
