"""The methods BADIT is compared with (METHOD.md section 6), as rank-1 components of badit.py's one Adapter that
differ only in how they start and in their `coefficients`, and `add_adapters`, the one function that adds any
method to a model.py Transformer:

    method            N        init                      c
    lora              r_lora   A kaiming, B = 0          1
    pissa             r_lora   top SVD, W -> residual    1
    loramoe           K r      A kaiming, B = 0          K softmax(mean_prompt(x) G^T), each expert's r components
    badit-noregroup   K r      top SVD, W -> residual    as loramoe
    badit             K r      top SVD, W -> residual    as loramoe, + regroup() during training (METHOD.md section 5)
    badit-nobad       K r      A kaiming, B = 0          as loramoe, + regroup() as badit: the paper's ablation
                                                         "w/o BAD" (DOG on experts that do not come from the SVD)
    cgc               (Kc + T Ks) r   A kaiming, B = 0   (Kc + Ks) softmax(gate[task]) on the task's experts, 0 elsewhere
    elrea             M r_lora        M trained LoRAs    1 on the row's own member's block, 0 elsewhere (ELREA's
                                                         ensemble, one LoRA per batch row; elrea.py builds it)
    o-lora            T r_lora        A kaiming, B = 0   1 on the branches of the tasks so far, 0 on later ones
    gainlora          T r_lora        A from features    a_i(u) on task i's branch (GainLoRA's gates, TaskGates),
                                      (InfLoRA), B = 0   0 on later ones

o-lora and gainlora are the continual baselines: one branch of r_lora components per task (T = the run's tasks in
the continual setting, 1 otherwise), task t training its own; continual.py holds their work at task boundaries and
in the step (O-LoRA's penalty, InfLoRA's A, the gradient projection memory).
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from badit import MoE, Adapter, kaiming_init, svd_init_experts
from checks import InputError
from routing import Routing


METHODS = ("lora", "pissa", "loramoe", "badit-noregroup", "badit", "badit-nobad", "cgc", "o-lora", "gainlora")  # train.py's loop
BRANCH_METHODS = ("o-lora", "gainlora")  # a branch per continual task (continual.py)
ADAPTERS = METHODS + ("elrea",)  # elrea's adapter: the ensemble that elrea.py's pipeline assembles
SVD_METHODS = ("pissa", "badit-noregroup", "badit")
REGROUP_METHODS = ("badit", "badit-nobad")  # DOG during training (section 5); badit-nobad's experts start as loramoe's


# ----------------------------------------------------------------------------------------------
# The peers' layers (METHOD.md section 6)


class LoRA(Adapter):
    """lora and pissa: one low-rank update of rank N = r_lora, no router.

    Each component is scaled by s = alpha / r with r the expert rank, as in every method (METHOD.md section
    6): a rank-32 LoRA is then exactly eight rank-4 experts without a router. PEFT would use alpha / r_lora.
    """

    def __init__(self, base, lora_rank, rank, alpha, dropout):
        super().__init__(base, lora_rank, rank, alpha, dropout)


class CGC(Adapter):
    """CGC-LoRA: Kc common experts shared by all tasks and Ks specific experts per task (METHOD.md section 6).

    Task t sees the common experts and its own Ks; its gate is a free logit vector over those
    Kc + Ks experts (zeros at start), softmax, times Kc + Ks so that c = 1 at start as for the
    other routed methods. The gate depends on the task id only, so a trained adapter merges per task.
    """

    def __init__(self, base, common, specific, num_tasks, rank, alpha, dropout, routing):
        super().__init__(base, (common + num_tasks * specific) * rank, rank, alpha, dropout)
        self.common, self.specific, self.num_tasks, self.routing = common, specific, num_tasks, routing
        self.gate = nn.Parameter(torch.zeros(num_tasks, common + specific, device=base.weight.device))

    def task_coefficients(self, task_ids):  # (B,) -> (B, N)
        g = (self.common + self.specific) * torch.softmax(self.gate[task_ids], dim=-1)  # (B, Kc + Ks)
        own = self.common + task_ids[:, None] * self.specific + torch.arange(self.specific, device=g.device)
        visible = torch.cat([torch.arange(self.common, device=g.device).expand(len(task_ids), -1), own], 1)
        experts = torch.zeros(len(task_ids), self.common + self.num_tasks * self.specific, device=g.device)
        return experts.scatter(1, visible, g).repeat_interleave(self.rank, dim=1)  # 0 on other tasks' experts

    def coefficients(self, x):
        if self.routing.task_ids is None:
            raise InputError("cgc adapters need a task id per sequence: pass task_ids=(B,) tensor to the model or to generate().")
        return self.task_coefficients(self.routing.task_ids.to(x.device))

class Ensemble(Adapter):
    """ELREA's C + 1 LoRAs (base + one per cluster) stacked as M blocks of r_lora components (METHOD.md
    section 6, step 5): a batch row uses only its own member's block, the member index given per row
    as routing.task_ids, so that one forward runs every member over the shared base model."""

    def __init__(self, base, members, lora_rank, rank, alpha, dropout, routing):
        super().__init__(base, members * lora_rank, rank, alpha, dropout)
        self.members, self.lora_rank, self.routing = members, lora_rank, routing

    def coefficients(self, x):
        if self.routing.task_ids is None:
            raise InputError("an elrea ensemble needs the member index of every row: pass task_ids=(B,).")
        member = F.one_hot(self.routing.task_ids.to(x.device), self.members).float()  # (B, M)
        return member.repeat_interleave(self.lora_rank, dim=1)  # (B, N): 1 on the row's member's block


class TaskBranches(Adapter):
    """o-lora and gainlora: a branch of r_lora components per task (components t r_lora .. (t + 1) r_lora - 1
    are task t's). While task t trains (`task`, a buffer, so a saved adapter knows it), only its branch
    gets gradients: the earlier branches' are zeroed by a hook, and as every task starts a fresh AdamW
    (zero moments, weight decay 0), they do not move at all; later branches are off (c = 0)."""

    def __init__(self, base, num_tasks, lora_rank, rank, alpha, dropout, train_A=True):
        super().__init__(base, num_tasks * lora_rank, rank, alpha, dropout)
        self.num_tasks, self.lora_rank = num_tasks, lora_rank
        self.register_buffer("task", torch.zeros((), dtype=torch.long, device=base.weight.device))
        self.A.requires_grad_(train_A)
        if train_A:
            self.A.register_hook(lambda g: g * self.trainable()[:, None])
        self.B.register_hook(lambda g: g * self.trainable()[None, :])

    def branch(self) -> torch.Tensor:  # (N,) the task of each component
        return torch.arange(self.A.shape[0], device=self.A.device) // self.lora_rank

    def trainable(self) -> torch.Tensor:  # (N,) 1 on the current task's branch
        return (self.branch() == self.task).float()


class OLoRA(TaskBranches):
    """O-LoRA (Wang et al., 2023): the sum of the branches of the tasks so far; its orthogonality penalty on
    the new branch's A against the old ones is continual.olora_penalty. With one task (mtl, single) it is lora."""

    def coefficients(self, x):
        return (self.branch() <= self.task).float()[None]  # (1, N)


class GainLoRA(TaskBranches):
    """GainLoRA (InfLoRA) (Liang and Li, 2025), as implemented here: task i's branch weighted by its gate
    a_i(u) (TaskGates, one for the model, on the pooled prompt embeddings), later tasks' branches off.
    A is fixed (InfLoRA: set from the task's input features by continual.begin_task), B trains. The buffers
    hold the gradient projection memory of this layer's inputs: `basis[:, :basis_size]`, orthonormal."""

    def __init__(self, base, num_tasks, lora_rank, rank, alpha, dropout, routing, gates):
        super().__init__(base, num_tasks, lora_rank, rank, alpha, dropout, train_A=False)
        n = base.weight.shape[1]
        self.routing, self.kept, self._gates = routing, routing.keep(), (gates,)  # a tuple: registered once, on the model
        self.register_buffer("basis", torch.zeros(n, n, device=base.weight.device))
        self.register_buffer("basis_size", torch.zeros((), dtype=torch.long, device=base.weight.device))

    def coefficients(self, x):
        if self.routing.mask is None:  # decoding: the gate computed at prefill
            return self.kept.gate
        a = self._gates[0](self.routing.embeddings, self.routing.mask)  # (B, T)
        a = a * (torch.arange(self.num_tasks, device=a.device) <= self.task)
        c = a.repeat_interleave(self.lora_rank, dim=1)  # (B, N)
        self.kept.gate = c
        return c


class TaskGates(nn.Module):
    """GainLoRA's gating module, one per model (model.task_gates), as implemented here on a decoder.

        u = masked mean of the input embeddings over the prompt                           (dim,)
        g_i(u) = SiLU(W2_i SiLU(W1_i u))      W1_i (h, dim), W2_i (dim, h), h = 100       (dim,)
        a_i(u) = | 2 sigmoid(4 cos(g_i(u), k_i)) - 1 |                                    in [0, 1)

    (the public code's Trans_input, prompt_key and cal_attention in src/t5_large.py; it pools the T5
    encoder's input embeddings, averaging over padding too: here over the prompt only). Task t trains
    W1_t, W2_t and k_t only (a hook zeroes the other rows' gradients); continual.py keeps their updates
    off the earlier tasks' inputs with the gradient projection memory in the buffers: the bases of the
    old u (dim), of SiLU(W1 u) (h) and of g(u) (dim), each `basis_*[:, :size]`, orthonormal."""

    def __init__(self, dim: int, num_tasks: int, hidden: int = 100, device=None):
        super().__init__()
        self.W1 = nn.Parameter(torch.empty(num_tasks, hidden, dim, device=device))
        self.W2 = nn.Parameter(torch.empty(num_tasks, dim, hidden, device=device))
        self.key = nn.Parameter(torch.empty(num_tasks, dim, device=device))
        for W in (self.W1, self.W2):  # as the public code's nn.Linear layers
            for i in range(num_tasks):
                nn.init.kaiming_uniform_(W.data[i], a=math.sqrt(5))
        nn.init.uniform_(self.key, -1, 1)
        self.register_buffer("task", torch.zeros((), dtype=torch.long, device=device))
        for name, size in (("u", dim), ("medium", hidden), ("out", dim)):
            self.register_buffer(f"basis_{name}", torch.zeros(size, size, device=device))
            self.register_buffer(f"size_{name}", torch.zeros((), dtype=torch.long, device=device))
        for p in (self.W1, self.W2, self.key):
            p.register_hook(lambda g: g * (torch.arange(len(g), device=g.device) == self.task).view(-1, *[1] * (g.dim() - 1)))

    @staticmethod
    def pooled(embeddings, mask):  # (B, L, dim), (B, L) -> u (B, dim), float32
        m = mask.float()[..., None]
        return (embeddings.float() * m).sum(1) / m.sum(1).clamp(min=1)

    def parts(self, u):  # u (B, dim) -> SiLU(W1 u) (B, T, h) and g(u) (B, T, dim), every task's
        medium = F.silu(torch.einsum("bd,thd->bth", u, self.W1))
        return medium, F.silu(torch.einsum("bth,tdh->btd", medium, self.W2))

    def forward(self, embeddings, mask):  # -> a (B, T)
        with torch.autocast(embeddings.device.type, enabled=False):  # float32, as the routers (METHOD.md section 8)
            _, g = self.parts(self.pooled(embeddings, mask))
            cos = F.cosine_similarity(g, self.key[None], dim=-1, eps=1e-12)  # (B, T)
            return (2 * torch.sigmoid(4 * cos) - 1).abs()


# ----------------------------------------------------------------------------------------------
# Adding adapters to a model


def add_adapters(model, method: str, targets=("gate_proj",), num_experts=8, rank=4, alpha=32.0, dropout=0.05,
                 lora_rank=None, top_k=None, num_tasks=None, common_experts=6, task_experts=2, members=None,
                 init=True) -> dict:
    """Wrap the target linears of a model.py Transformer, freeze everything else (METHOD.md section 6).

    lora and pissa use lora_rank (default num_experts x rank, the same total rank as BADIT).
    cgc needs num_tasks; elrea (an ensemble of trained LoRAs, filled by elrea.py) needs members.
    Returns (and prints, and keeps as model.adapter_config) the method, its hyperparameters, the
    trainable-parameter count and the rank active per example.
    """
    if method == "elrea" and not members:
        raise InputError("an elrea ensemble needs members (its base LoRA and one LoRA per cluster).")
    if method == "cgc" and not num_tasks:
        raise InputError("cgc needs num_tasks (the number of tasks, each with its own specific experts).")
    if method in BRANCH_METHODS:
        num_tasks = num_tasks or 1  # a branch per continual task; one in mtl and single
    check_top_k(method, top_k, num_experts)
    names = check_adapters(model, method, targets, num_experts, rank, lora_rank)
    lora_rank = lora_rank or num_experts * rank
    config = dict(method=method, targets=list(targets), num_experts=num_experts, rank=rank, alpha=alpha, dropout=dropout,
                  lora_rank=lora_rank, top_k=top_k, num_tasks=num_tasks, common_experts=common_experts, task_experts=task_experts,
                  members=members)

    model.requires_grad_(False)
    model.routing = model.routing or Routing()
    for name in tqdm(names, desc=f"{method} adapters", unit="layer", disable=not init or method not in SVD_METHODS):
        parent, _, leaf = name.rpartition(".")
        base = model.get_submodule(name)
        if method in ("lora", "pissa"):
            adapter = LoRA(base, lora_rank, rank, alpha, dropout)
        elif method == "cgc":
            adapter = CGC(base, common_experts, task_experts, num_tasks, rank, alpha, dropout, model.routing)
        elif method == "elrea":
            adapter = Ensemble(base, members, lora_rank, rank, alpha, dropout, model.routing)
        elif method == "o-lora":
            adapter = OLoRA(base, num_tasks, lora_rank, rank, alpha, dropout)
        elif method == "gainlora":
            if not hasattr(model, "task_gates"):
                model.task_gates = TaskGates(model.args.dim, num_tasks, device=base.weight.device)
            adapter = GainLoRA(base, num_tasks, lora_rank, rank, alpha, dropout, model.routing, model.task_gates)
        else:
            adapter = MoE(base, num_experts, rank, alpha, dropout, model.routing, top_k)
        if method in SVD_METHODS:  # the initial components, which define the frozen residual
            adapter.register_buffer("A0", torch.zeros_like(adapter.A))
            adapter.register_buffer("B0", torch.zeros_like(adapter.B))
        if init:
            svd_init_experts(adapter) if method in SVD_METHODS else kaiming_init(adapter)
        setattr(model.get_submodule(parent), leaf, adapter)

    active = {"lora": lora_rank, "pissa": lora_rank, "cgc": (common_experts + task_experts) * rank, "elrea": lora_rank,
              "o-lora": num_tasks and num_tasks * lora_rank, "gainlora": num_tasks and num_tasks * lora_rank}  # after T tasks
    config["active_rank"] = active.get(method, (top_k or num_experts) * rank)
    config["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{method}: {len(names)} layers adapted ({', '.join(targets)}), {config['trainable_params']:,} trainable "
          f"parameters, active rank {config['active_rank']} per example", file=sys.stderr)  # stdout: a command's output
    model.adapter_config = config
    return config


def check_top_k(method: str, top_k: int | None, num_experts: int):
    """Sparse routing (METHOD.md section 4): loramoe only, and 1 <= k <= K (train.py checks it too, before any run)."""
    if top_k is not None and method != "loramoe":
        why = ("with SVD experts the tied gates at step 0 would drop all but k experts and the model would not start "
               "at its own function (METHOD.md section 4)" if method in SVD_METHODS else "it is badit's ablation and routes "
               "densely as badit does" if method == "badit-nobad" else f"{method} has no router")
        raise InputError(f"--top-k is for loramoe only: {why}. Leave --top-k out for {method}.")
    if top_k is not None and not 1 <= top_k <= num_experts:
        raise InputError(f"--top-k {top_k} must be between 1 and --num-experts ({num_experts}).")


def check_adapters(model, method: str, targets, num_experts: int, rank: int, lora_rank: int | None) -> list[str]:
    """The names of the linears `targets` selects, refusing an unknown method, targets that match no linear
    layer, and SVD components that do not fit a layer (METHOD.md section 3.1). Works on a model on the meta
    device, so that a run can check its adapters before any weight is loaded."""
    if method not in ADAPTERS:
        raise InputError(f"unknown method {method!r}; choose one of {', '.join(ADAPTERS)}.")
    # the decoder layers' linears: lm_head is read directly by the loss and by generation, so an adapter there would
    # never be trained (nor used)
    linears = {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear) and name.startswith("layers.")}
    names = [name for name in linears if name.split(".")[-1] in targets]
    unmatched = [t for t in targets if not any(name.split(".")[-1] == t for name in names)]
    if unmatched:
        kinds = sorted({n.split(".")[-1] for n in linears})
        raise InputError(f"--targets {', '.join(unmatched)} match{'es' if len(unmatched) == 1 else ''} no linear layer; the "
                         f"model's decoder layers' linears are named {', '.join(kinds)}.")
    N = (lora_rank or num_experts * rank) if method == "pissa" else num_experts * rank
    for name in names if method in SVD_METHODS else []:
        m, n = linears[name].weight.shape
        if N > min(m, n):
            raise InputError(f"{N} SVD components ({'--lora-rank' if method == 'pissa' else 'experts x rank'}) exceed "
                             f"min(out, in) = {min(m, n)} of {name} ({m} x {n}); lower the rank or the number of experts.")
    for name in names if method == "gainlora" else []:  # InfLoRA's A: r_lora directions of the layer's input space
        m, n = linears[name].weight.shape
        if (lora_rank or num_experts * rank) > n:
            raise InputError(f"gainlora's branch rank {lora_rank or num_experts * rank} exceeds the input size {n} of "
                             f"{name}; lower --lora-rank.")
    return names
