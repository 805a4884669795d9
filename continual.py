"""The continual baselines' work at task boundaries and in the step: O-LoRA and GainLoRA (InfLoRA).

methods.py holds their layers (TaskBranches, OLoRA, GainLoRA, TaskGates: one branch of r_lora
components per task). train.py calls, for these two methods: begin_task before each task (and before
the one phase of mtl and single), penalty after each backward, constrain on each phase's optimizer,
end_task after each continual task. As implemented here, for both: our decoder models and targets
(default gate_proj), rank r_lora per task (GainLoRA's scripts: 4 on T5's q and v, with the same scaling
alpha / r = 8 as ours), the study's recipe (learning rate, epochs, batch, dropout) and no replay of old
data.

O-LoRA (Wang et al., Findings of EMNLP 2023; github.com/cmnfriend/O-LoRA, src/uie_trainer_lora.py
training_step, src/peft/tuners/lora.py Linear.forward): task t trains a new LoRA (A_t, B_t), the earlier
ones stay frozen and are summed into the output, and the loss adds

    lambda_1 sum_layers sum_ij |(A_old A_t^T)_ij|  +  lambda_2 sum_layers (||A_t||_F + ||B_t||_F)

with A_old the earlier tasks' A stacked, lambda_1 = 0.5 and lambda_2 = 0 (the repository's
scripts/order_*.sh and scripts_llama/order_*.sh; it has no SuperNI scripts). Here the penalty is added
once per optimizer step; the public code adds it to every micro-batch's loss, which multiplies it under
gradient accumulation.

GainLoRA (InfLoRA) (Liang and Li, NeurIPS 2025; github.com/liangyanshuo/gainlora: src/t5_large.py,
src/cl_trainer_gainlora_inflora.py get_reg_matrix, get_repsentation and the step in
_inner_training_loop, gen_script_superni_order*_t5_gainlora_inflora.sh):
  before task t:  M_l = mean of x x^T over the real tokens of the task's training sequences, x the input
                  of adapted layer l (the public code averages over padding too);
                  A_t = U[:, :r]^T / sqrt(3), U the left singular vectors of (I - P_l) M_l, P_l = U_l U_l^T
                  the projector on layer l's memory basis (empty for t = 0): the directions of the new task's
                  inputs that the old tasks' inputs do not use. B_t = 0 and trains; A_t stays.
                  W1_t, W2_t <- W1_{t-1}, W2_{t-1} (t > 0); k_t = the top left singular vector of
                  (I - P_out) M_out, M_out = mean g_t(u) g_t(u)^T over the task's sequences, at k_t's initial norm.
  each step, t > 0: W <- W - (W - W_before) P for W1_t (P_u), W2_t (P_medium) and k_t (P_out), then each row
                  rescaled to its norm after the step: the update is kept off the old tasks' inputs, so that
                  the new gate stays near 0 on them (its key starts orthogonal to their g(u)). The projection
                  alone would keep g_t on the old inputs exactly; the public code's rescaling leaks through
                  SiLU (tests/test_continual.py measures it) and is kept, as the code has it.
  after task t:   every memory basis grows by GPM's rule (Saha et al., ICLR 2021) from the trained model's
                  features on the task's data, threshold theta_t = theta + (1 - theta) t / T, theta = 0.995
                  (the scripts' --threshold and --transthreshold; T = 15 there, the run's task count here).
Not recovered or not ported: the chunked covariances (--chunk, 1 in every script); the KL replay of the
gates on pseudo-samples (data_replay_freq -1 in the SuperNI scripts except for the last task of order 1's,
whose generated_data/ folder the repository does not hold); the T5 encoder/decoder split (the gate here reads the decoder's input embeddings, pooled over the
prompt), early stopping on dev ROUGE-L (every method here trains the recipe's epochs).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from badit import adapters_of
from methods import GainLoRA, OLoRA, TaskBranches
from data import collate

THRESHOLD = 0.995  # GainLoRA's GPM threshold (its SuperNI scripts)
A_SCALE = 1 / math.sqrt(3)  # InfLoRA's A: unit rows / sqrt(3 x chunk), chunk = 1


def branches(model, kind=TaskBranches) -> dict:
    return {name: a for name, a in adapters_of(model).items() if isinstance(a, kind)}


def set_task(model, t: int):
    """The branch (and GainLoRA gate) that trains from now on; the earlier ones are frozen, later ones off."""
    for a in branches(model).values():
        a.task.fill_(t)
    if hasattr(model, "task_gates"):
        model.task_gates.task.fill_(t)


def begin_task(model, t: int, examples, pad_id: int, init: bool = True):
    """Before task t: its branch becomes the trained one; with init (not a resume inside the task), GainLoRA
    sets A_t and k_t from the task's features and starts W1_t, W2_t from task t - 1's (module docstring)."""
    set_task(model, t)
    layers = branches(model, GainLoRA)
    if not init or not layers:
        return
    gates = model.task_gates
    with torch.no_grad():
        if t > 0:
            gates.W1[t], gates.W2[t] = gates.W1[t - 1], gates.W2[t - 1]
        f = features(model, examples, pad_id, t)
        for name, a in layers.items():
            r = a.lora_rank
            a.A[t * r:(t + 1) * r] = top_directions(f[name], a.basis[:, :a.basis_size], r).T * A_SCALE
        norm = gates.key[t].norm()
        gates.key[t] = top_directions(f["out"], gates.basis_out[:, :gates.size_out], 1)[:, 0] * norm
    broadcast_state(model)


def end_task(model, t: int, examples, pad_id: int, num_tasks: int):
    """After task t: every memory basis grows from the trained model's features on the task (GPM)."""
    layers = branches(model, GainLoRA)
    if not layers:
        return
    threshold = THRESHOLD + (1 - THRESHOLD) * t / num_tasks
    f = features(model, examples, pad_id, t)
    with torch.no_grad():
        for name, a in layers.items():
            grow_basis(a.basis, a.basis_size, f[name], threshold)
        g = model.task_gates
        for part in ("u", "medium", "out"):
            grow_basis(getattr(g, f"basis_{part}"), getattr(g, f"size_{part}"), f[part], threshold)
    broadcast_state(model)


def top_directions(M, basis, k: int):
    """The k top left singular vectors of (I - U U^T) M, U = basis (n, size) orthonormal -> (n, k)."""
    R = M - basis @ (basis.T @ M)
    return torch.linalg.svd(R).U[:, :k]


@torch.no_grad()
def grow_basis(basis, size, M, threshold: float):
    """GPM (Saha et al. 2021, as the GainLoRA code): add to basis[:, :size] the fewest new directions of M
    (an uncentred covariance) that bring the captured share of M's squared singular values to the
    threshold. The first task keeps U[:, :r], r = #(cumulative share < threshold), at least 1."""
    n, k = basis.shape[0], int(size)
    U, S, _ = torch.linalg.svd(M)
    total = (S ** 2).sum()
    if k == 0:
        r = max(int((torch.cumsum(S ** 2 / total, 0) < threshold).sum()), 1)
        new = U[:, :r]
    else:
        old = basis[:, :k]
        U, S, _ = torch.linalg.svd(M - old @ (old.T @ M))
        captured, r = float((total - (S ** 2).sum()) / total), 0
        for share in (S ** 2 / total).tolist():
            if captured >= threshold:
                break
            captured, r = captured + share, r + 1
        new = U[:, :r]
    r = min(new.shape[1], n - k)
    basis[:, k:k + r] = new[:, :r]
    size.fill_(k + r)


@torch.no_grad()
def features(model, examples, pad_id: int, t: int, batch_size: int = 8) -> dict:
    """The task's features with the model as it is (eval mode, no dropout, no random draws): per GainLoRA
    layer, M = mean x x^T of its input over the real tokens; for the gates of task t, the uncentred
    covariances of u, SiLU(W1_t u) and g_t(u), one u per sequence (the pooled prompt embedding)."""
    gates = model.task_gates
    sums, count, tokens = {}, [0], {}
    hooks = []
    for name, a in branches(model, GainLoRA).items():
        def hook(module, inputs, name=name):
            x = inputs[0].float().flatten(0, 1)[tokens["mask"]]  # (real tokens, n)
            with torch.autocast(x.device.type, enabled=False):  # the forward runs under bf16 autocast: sum in float32
                sums[name] = sums.get(name, 0) + x.T @ x
        hooks.append(a.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(examples), batch_size):
            x = collate(examples[i:i + batch_size], pad_id, model.lm_head.weight.device)
            tokens["mask"] = x["mask"].flatten().bool()
            count[0] += int(x["mask"].sum())
            model(x["ids"], x["mask"], route_mask=x["route"], logits_at=torch.zeros_like(x["mask"], dtype=torch.bool))
            u = gates.pooled(model.routing.embeddings, x["route"])  # (B, dim)
            medium, g = gates.parts(u)
            for part, v in (("u", u), ("medium", medium[:, t]), ("out", g[:, t])):
                sums[part] = sums.get(part, 0) + v.T @ v
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {k: v / (len(examples) if k in ("u", "medium", "out") else count[0]) for k, v in sums.items()}


def penalty(model, orth: float, l2: float):
    """O-LoRA's regulariser (module docstring) on the current task's branches; None where it adds nothing
    (other methods, the first task with lambda_2 = 0), so that o-lora on one task is lora exactly."""
    total = None
    for a in branches(model, OLoRA).values():
        t, r = int(a.task), a.lora_rank
        A_t, terms = a.A[t * r:(t + 1) * r], []
        if t > 0 and orth:
            terms.append(orth * (a.A[:t * r] @ A_t.T).abs().sum())
        if l2:
            terms.append(l2 * (A_t.norm() + a.B[:, t * r:(t + 1) * r].norm()))
        for term in terms:
            total = term if total is None else total + term
    return total


def constrain(model, optimizer):
    """GainLoRA, task t > 0: after every optimizer step, W <- W - (W - W_before) P for the current task's
    W1, W2 and key, each row then rescaled to its norm after the step (module docstring)."""
    gates = getattr(model, "task_gates", None)
    if gates is None:
        return
    before = {}

    def keep(*_):
        t = int(gates.task)
        before.clear()
        if t > 0:
            before.update(t=t, W1=gates.W1[t].detach().clone(), W2=gates.W2[t].detach().clone(),
                          key=gates.key[t:t + 1].detach().clone())

    @torch.no_grad()
    def project(*_):
        if not before:
            return
        t = before["t"]
        for name, part in (("W1", "u"), ("W2", "medium"), ("key", "out")):
            U = getattr(gates, f"basis_{part}")[:, :getattr(gates, f"size_{part}")]
            W = getattr(gates, name)[t] if name != "key" else gates.key[t:t + 1]  # (rows, in)
            moved = W - ((W - before[name]) @ U) @ U.T
            W.copy_(moved * W.norm(dim=1, keepdim=True) / moved.norm(dim=1, keepdim=True).clamp(min=1e-12))

    optimizer.register_step_pre_hook(keep)
    optimizer.register_step_post_hook(project)


def broadcast_state(model):
    """Under torchrun every rank computed the same features; rank 0's result is applied everywhere, so that a
    nondeterministic kernel can never split the ranks."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    tensors = [a.A for a in branches(model, GainLoRA).values()] + [b for a in branches(model, GainLoRA).values()
                                                                      for b in (a.basis, a.basis_size)]
    g = model.task_gates
    tensors += [g.W1, g.W2, g.key] + [getattr(g, f"{k}_{p}") for p in ("u", "medium", "out") for k in ("basis", "size")]
    with torch.no_grad():
        for x in tensors:
            dist.broadcast(x.data, src=0)
