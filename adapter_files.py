"""An adapter's files: saving and loading (adapter.safetensors + adapter_config.json, exactly), removing it, the
PEFT export (lora, pissa, o-lora) and merging into the base weights (lora, pissa, o-lora, cgc per task)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from badit import MoE, adapters_of, set_residual
from checks import InputError, MissingFile
from files import ADAPTER_CONFIG, atomic_write, read_record, read_safetensors
from hf import hf_name
from methods import CGC, SVD_METHODS, Ensemble, GainLoRA, OLoRA, add_adapters


def adapter_state(model) -> dict[str, torch.Tensor]:
    """Every adapter tensor but the frozen base layer: A, B, the router or gate, A0 and B0, GainLoRA's
    task gates and projection bases."""
    state = {f"{name}.{k}": v.detach().contiguous() for name, a in adapters_of(model).items()
             for k, v in a.state_dict().items() if not k.startswith("base.")}
    if hasattr(model, "task_gates"):
        state |= {f"task_gates.{k}": v.detach().contiguous() for k, v in model.task_gates.state_dict().items()}
    return state


def save_adapters(model, out_dir):
    """adapter.safetensors + adapter_config.json (method and hyperparameters), written atomically."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "adapter.safetensors", lambda f: save_file(adapter_state(model), f))
    atomic_write(out / "adapter_config.json", lambda f: Path(f).write_text(json.dumps(model.adapter_config, indent=2)))


def load_adapters(model, adapter_dir) -> dict:
    """Restore save_adapters' output onto a freshly loaded base model, exactly: the residual of the SVD
    methods is rebuilt from the saved A0, B0 (never from a new SVD, which need not be bitwise equal)."""
    adapter_dir = Path(adapter_dir)
    for name in ("adapter_config.json", "adapter.safetensors"):
        if not (adapter_dir / name).is_file():
            raise MissingFile(f"{adapter_dir / name} is missing: pass a folder written by save_adapters (a run directory).")
    config = read_record(adapter_dir / "adapter_config.json", ADAPTER_CONFIG,
                         "it was not written completely or was edited; use a complete run directory")
    hyper = {k: v for k, v in config.items() if k not in ("method", "active_rank", "trainable_params")}
    add_adapters(model, config["method"], **hyper, init=False)
    load_adapter_state(model, adapter_dir / "adapter.safetensors")
    if config["method"] in SVD_METHODS:  # the base weight is still W0: make it W0 - s B0 A0
        for a in adapters_of(model).values():
            set_residual(a)
    return config


def load_adapter_state(model, file):
    """Copy adapter.safetensors into the model's adapters, added with the same config (the base weights
    are left as they are)."""
    state = read_safetensors(file, "it was not written completely; use a complete run directory",
                             device=model.lm_head.weight.device)
    expected = adapter_state(model)
    if set(state) != set(expected):
        diff = sorted(set(state) ^ set(expected))[:3]
        raise InputError(f"{file} does not fit this model and adapter_config.json (e.g. {diff}).")
    wrong = [f"{k} {tuple(state[k].shape)} against {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape]
    if wrong:  # an adapter of another rank or number of experts than adapter_config.json says
        raise InputError(f"{file} does not fit adapter_config.json beside it ({'; '.join(wrong[:2])}"
                         f"{f' and {len(wrong) - 2} more' if len(wrong) > 2 else ''}): the two files come from different "
                         f"runs. Restore the folder from a copy, or train again.")
    for name, a in adapters_of(model).items():
        a.load_state_dict({k: state[f"{name}.{k}"] for k in a.state_dict() if not k.startswith("base.")}, strict=False)
    if hasattr(model, "task_gates"):
        model.task_gates.load_state_dict({k: state[f"task_gates.{k}"] for k in model.task_gates.state_dict()})


def remove_adapters(model):
    """Unwrap every adapter, putting the frozen base linears back (for the SVD methods these hold the
    residual W0 - s B0 A0, not W0: merge or reload the model to get W0 back)."""
    for name, a in adapters_of(model).items():
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, a.base)
    if hasattr(model, "task_gates"):
        del model.task_gates
    model.adapter_config, model.routing = None, None
    return model


def export_peft(model, out_dir, base_model_name_or_path: str = ""):
    """Write a lora or pissa adapter in PEFT's format (adapter_config.json + adapter_model.safetensors).

    PEFT scales by lora_alpha / r, so lora_alpha = s x r_lora keeps our s = alpha / r (METHOD.md section 6).
    A pissa adapter is exported as PEFT's documented PiSSA-to-LoRA conversion: rank 2 r_lora with
    A' = [A; A0], B' = [B, -B0] (lora_alpha doubled too, keeping s), so that it applies to the
    original, unmodified base weights: W0 + s (B A - B0 A0) = W_res + s B A.
    """
    from safetensors.torch import save_file

    cfg = model.adapter_config
    if cfg["method"] not in ("lora", "pissa", "o-lora"):
        raise InputError(f"PEFT export covers lora, pissa and o-lora; {cfg['method']} has no PEFT equivalent.")
    pissa = cfg["method"] == "pissa"
    tensors = {}
    for name, a in adapters_of(model).items():
        A, B = (torch.cat([a.A, a.A0]), torch.cat([a.B, -a.B0], 1)) if pissa else (a.A, a.B)
        if isinstance(a, OLoRA):  # the branches of the tasks so far: one LoRA of rank (t + 1) r_lora
            A, B = A[:(a.task + 1) * a.lora_rank], B[:, :(a.task + 1) * a.lora_rank]
        key = f"base_model.model.{hf_name(name)}"
        tensors[key + ".lora_A.weight"] = A.detach().contiguous()
        tensors[key + ".lora_B.weight"] = B.detach().contiguous()
    r = next(iter(tensors.values())).shape[0]
    peft_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
                   "r": r, "lora_alpha": cfg["alpha"] / cfg["rank"] * r, "lora_dropout": cfg["dropout"],
                   "target_modules": cfg["targets"], "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
                   "use_rslora": False, "use_dora": False, "modules_to_save": None}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "adapter_model.safetensors", lambda f: save_file(tensors, f, metadata={"format": "pt"}))
    atomic_write(out / "adapter_config.json", lambda f: Path(f).write_text(json.dumps(peft_config, indent=2)))


@torch.no_grad()
def merge_adapters(model, task_id: int | None = None):
    """Fold lora, pissa or one task's cgc adapter into the base weights and remove the adapters:
    W <- W + s B diag(c) A. Only a fixed c can be folded in: a router's gate depends on each input, and
    ELREA's ensemble weighs its members' logits per query, which no single weight matrix computes."""
    for name, a in adapters_of(model).items():
        if isinstance(a, (MoE, GainLoRA)):
            raise InputError(f"{model.adapter_config['method']} gates depend on each input, so they cannot be merged "
                             "into the weights.")
        if isinstance(a, Ensemble):
            raise InputError("an elrea ensemble mixes its members' logits with per-query weights, which no weight "
                             "matrix computes: it cannot be merged (merge one member's LoRA, base/ or experts/c<k>/).")
        if isinstance(a, CGC) and task_id is None:
            raise InputError("merging a cgc adapter needs task_id: its gate depends on the task.")
        c = (a.task_coefficients(torch.tensor([task_id], device=a.A.device))[0] if isinstance(a, CGC) else
             a.coefficients(None)[0] if isinstance(a, OLoRA) else 1.0)
        W = a.base.weight
        W.data = (W.float() + a.scaling * (a.B * c) @ a.A).to(W.dtype)
    return remove_adapters(model)
