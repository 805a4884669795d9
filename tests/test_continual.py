"""The continual baselines (continual.py, methods.py's TaskBranches): O-LoRA's penalty against a brute-force sum,
o-lora on one task is lora, earlier branches never move, InfLoRA's A and GainLoRA's key avoid the old tasks'
subspaces, the gate projection keeps the new gate off the old inputs, GPM's rule, and a continual run of each
resumed after a kill in its second task."""

import json
from pathlib import Path

import pytest
import torch

import continual
import train
from adapter_files import load_adapters
from badit import adapters_of
from conftest import cut_and_resume
from data import encode_examples, load_tasks
from hf import load_model, load_tokenizer
from methods import GainLoRA, TaskGates, add_adapters
from test_train import FAST, log_of, losses, run, train_argv

TWO = ["--tasks", "sort_ascending,copy_words"]  # two tasks with different inputs


def adapter_file(folder):
    from safetensors.torch import load_file
    return load_file(str(Path(folder) / "adapter.safetensors"))


def test_olora_penalty_equals_a_brute_force_sum(tiny_trainable):
    model = load_model(tiny_trainable, device="cpu", dtype=torch.float32)
    add_adapters(model, "o-lora", num_tasks=3, lora_rank=2, dropout=0.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for a in adapters_of(model).values():
            a.A.copy_(torch.randn(a.A.shape, generator=g))
            a.B.copy_(torch.randn(a.B.shape, generator=g))
    continual.set_task(model, 2)
    expected = 0.0
    for a in adapters_of(model).values():
        A, B = a.A.tolist(), a.B.tolist()
        for s in range(4):  # the rows of tasks 0 and 1
            for j in range(4, 6):  # the rows of task 2
                expected += 0.5 * abs(sum(A[s][k] * A[j][k] for k in range(len(A[0]))))
        expected += 0.1 * (sum(A[j][k] ** 2 for j in range(4, 6) for k in range(len(A[0]))) ** 0.5
                           + sum(B[i][j] ** 2 for i in range(len(B)) for j in range(4, 6)) ** 0.5)
    assert continual.penalty(model, 0.5, 0.1).item() == pytest.approx(expected, rel=1e-5)
    continual.set_task(model, 0)
    assert continual.penalty(model, 0.5, 0.0) is None  # the first task: nothing to be orthogonal to


def test_olora_on_one_task_is_lora(tiny_trainable, tmp_path):
    for method in ("lora", "o-lora"):
        run(tiny_trainable, tmp_path / method, "--method", method, "--eval", "none")
    assert losses(tmp_path / "lora") == losses(tmp_path / "o-lora")
    ours, theirs = adapter_file(tmp_path / "o-lora"), adapter_file(tmp_path / "lora")
    assert {k for k in ours if not k.endswith(".task")} == set(theirs)
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)


@pytest.mark.parametrize("method", ["o-lora", "gainlora"])
def test_earlier_branches_never_move_and_a_kill_in_task_2_resumes_exactly(tiny_trainable, tmp_path, monkeypatch, method):
    extra = ["--method", method, "--setting", "continual", "--eval", "after", "--lora-rank", "4", *TWO]
    run(tiny_trainable, tmp_path / "full", *extra)
    first = adapter_file(tmp_path / "full" / "after_1_sort_ascending")
    last = adapter_file(tmp_path / "full")
    for k, v in first.items():
        if k.endswith(".A") or k.endswith(".B"):
            rows = (slice(0, 4), slice(None)) if k.endswith(".A") else (slice(None), slice(0, 4))
            assert torch.equal(v[rows], last[k][rows]), k  # task 1's branch, bitwise
            later = (slice(4, 8), slice(None)) if k.endswith(".A") else (slice(None), slice(4, 8))
            assert k.endswith(".A") and method == "o-lora" or not torch.equal(v[later], last[k][later]), k
    if method == "gainlora":
        for k in ("task_gates.W1", "task_gates.W2", "task_gates.key"):
            assert torch.equal(first[k][0], last[k][0]) and not torch.equal(first[k][1], last[k][1])
        assert int(first["task_gates.size_u"]) >= 1 and int(last["task_gates.size_u"]) >= int(first["task_gates.size_u"])
    else:
        penalties = [e["penalty"] for e in log_of(tmp_path / "full") if "penalty" in e]
        assert len(penalties) == 4 and all(p > 0 for p in penalties)  # task 2's steps only

    cut_and_resume(monkeypatch, train_argv(tiny_trainable, *extra), tmp_path / "cut", 4 + 2)  # step 2 of task 2
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    full, cut = (json.loads((tmp_path / d / "continual.json").read_text()) for d in ("full", "cut"))
    assert cut == full
    assert all(torch.equal(v, adapter_file(tmp_path / "cut")[k]) for k, v in last.items())


def task_examples(tiny_trainable, task):
    tok = load_tokenizer(tiny_trainable)
    return encode_examples(tok, load_tasks("classroom", [task], "train", 8), [task], 256, 50, train=True, seed=0), tok


def test_inflora_a_and_the_new_key_avoid_the_old_tasks_subspaces(tiny_trainable):
    model = load_model(tiny_trainable, device="cpu", dtype=torch.float32)
    add_adapters(model, "gainlora", num_tasks=2, lora_rank=4, dropout=0.0)
    old, tok = task_examples(tiny_trainable, "sort_ascending")
    new, _ = task_examples(tiny_trainable, "copy_words")
    continual.begin_task(model, 0, old, tok.pad_token_id)
    continual.end_task(model, 0, old, tok.pad_token_id, num_tasks=2)
    before = {k: v.clone() for k, v in model.task_gates.state_dict().items()}
    A0 = {n: a.A[:4].clone() for n, a in adapters_of(model).items()}
    continual.begin_task(model, 1, new, tok.pad_token_id)
    g = model.task_gates
    assert torch.equal(g.W1[1], before["W1"][0]) and torch.equal(g.W2[1], before["W2"][0])  # starts from task 1's
    assert g.key[1].norm().item() == pytest.approx(before["key"][1].norm().item(), rel=1e-5)
    U_out = g.basis_out[:, :g.size_out]
    assert 0 < g.size_out < g.basis_out.shape[0]
    assert (g.key[1] @ U_out).abs().max() < 1e-4 * g.key[1].norm()  # orthogonal to the old gate outputs
    for name, a in adapters_of(model).items():
        assert isinstance(a, GainLoRA) and torch.equal(a.A[:4], A0[name])
        U = a.basis[:, :a.basis_size]
        assert 0 < a.basis_size
        torch.testing.assert_close(a.A[4:8].norm(dim=1), torch.full((4,), 3 ** -0.5))
        if a.basis_size + 4 <= a.basis.shape[0]:  # room for 4 new directions
            assert (a.A[4:8] @ U).abs().max() < 1e-4


def test_grow_basis_follows_gpm():
    Q, _ = torch.linalg.qr(torch.randn(10, 5, generator=torch.Generator().manual_seed(0)))
    old, new = Q[:, :3], Q[:, 3:]  # a task using 3 directions equally, then one using 2 others
    basis, size = torch.zeros(10, 10), torch.zeros((), dtype=torch.long)
    # the first task keeps r = #(cumulative share < threshold) directions, as GPM's and GainLoRA's code (no + 1):
    # shares 1/3, 2/3, 1 -> 2
    continual.grow_basis(basis, size, old @ old.T, 0.995)
    assert int(size) == 2
    continual.grow_basis(basis, size, old @ old.T, 0.995)  # later: add until the captured share reaches it
    assert int(size) == 3
    continual.grow_basis(basis, size, old @ old.T, 0.995)  # nothing left to add
    assert int(size) == 3
    continual.grow_basis(basis, size, new @ new.T, 0.995)
    assert int(size) == 5
    U = basis[:, :5]
    torch.testing.assert_close(U.T @ U, torch.eye(5), atol=1e-5, rtol=0)
    assert (Q - U @ (U.T @ Q)).norm() < 1e-4  # both tasks' directions are in the memory


def gate_change(constrained: bool, lr: float = 1e-3):
    """Train task 1's gate to open on new inputs for 30 AdamW steps; -> the change of a_1 on the old inputs and
    on the new ones."""
    torch.manual_seed(0)
    gates = TaskGates(dim=16, num_tasks=2, hidden=8)
    old = torch.randn(6, 4) @ torch.randn(4, 16)  # the old task's pooled inputs, in a 4-dimensional subspace
    new = torch.randn(6, 16)
    gates.task.fill_(0)
    with torch.no_grad():
        medium, g = gates.parts(old)
    for part, F in (("u", old), ("medium", medium[:, 0]), ("out", g[:, 0])):  # exact bases of the old features
        U, S, _ = torch.linalg.svd(F.T, full_matrices=False)
        k = int((S > 1e-5 * S[0]).sum())
        getattr(gates, f"basis_{part}")[:, :k] = U[:, :k]
        getattr(gates, f"size_{part}").fill_(k)
    gates.task.fill_(1)
    with torch.no_grad():
        gates.W1[1], gates.W2[1] = gates.W1[0], gates.W2[0]
        out = gates.basis_out[:, :gates.size_out]
        gates.key[1] -= out @ (out.T @ gates.key[1])  # as begin_task: orthogonal to the old outputs
    opt = torch.optim.AdamW(gates.parameters(), lr=lr, weight_decay=0.0)
    if constrained:
        continual.constrain(type("M", (), {"task_gates": gates})(), opt)
    mask = torch.ones(6, 1)
    at = lambda u: gates(u[:, None, :], mask)[:, 1].detach()  # one-token "sequences": u itself
    start_old, start_new = at(old), at(new)
    for _ in range(30):
        opt.zero_grad()
        (-gates(new[:, None, :], mask)[:, 1].sum()).backward()
        opt.step()
    return (at(old) - start_old).abs().max().item(), (at(new) - start_new).abs().mean().item(), start_old


def test_the_gate_projection_keeps_the_new_gate_off_the_old_inputs():
    """The projected update alone would leave g_1 on the old inputs exactly where it was; the public code then
    rescales each row to its norm after the step, which leaks (through SiLU) and which is kept as it is."""
    kept_old, kept_new, start = gate_change(constrained=True)
    free_old, free_new, _ = gate_change(constrained=False)
    assert start.abs().max() < 1e-3  # the new key starts orthogonal to the old tasks' gate outputs: a_1 = 0 there
    assert kept_new > 0.1 and free_new > 0.1  # the gate learns to open on the new inputs either way
    assert kept_old < 0.5 * kept_new and kept_old < 0.5 * free_old  # on the old inputs it moves far less


def test_a_saved_gainlora_adapter_reloads_with_its_gates_and_memory(tiny_trainable, tmp_path):
    """In bf16, as the studies run on a CPU with native bf16 (the features are summed in float32 under autocast)."""
    extra = ["--method", "gainlora", "--setting", "continual", "--eval", "none", "--lora-rank", "4", *TWO,
             "--dtype", "bfloat16"]
    run(tiny_trainable, tmp_path / "run", *extra)
    assert all(v.dtype == torch.float32 for v in adapter_file(tmp_path / "run").values() if v.is_floating_point())
    model = load_model(tiny_trainable, device="cpu", dtype=torch.float32)
    load_adapters(model, tmp_path / "run")
    assert int(model.task_gates.task) == 1 and all(int(a.task) == 1 for a in adapters_of(model).values())
    assert int(model.task_gates.size_u) >= 1
    with pytest.raises(ValueError, match="gates depend on each input"):
        from adapter_files import merge_adapters
        merge_adapters(model)


def test_weight_decay_is_refused_where_it_would_move_frozen_branches(tiny_trainable, tmp_path):
    with pytest.raises(SystemExit) as stop:
        train.parse_args(["--method", "o-lora", "--setting", "continual", "--weight-decay", "0.01"])
    assert stop.value.code == 2
    with pytest.raises(ValueError, match="--orth-lambda is for o-lora only"):
        train.parse_args(["--method", "lora", "--orth-lambda", "1"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["o-lora", "gainlora"])
def test_torchrun_two_processes_match_one_in_the_continual_setting(tiny_trainable, tmp_path, method):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    logs = {}
    for nproc in (1, 2):
        out = tmp_path / str(nproc)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "train.py"), "--model", str(tiny_trainable), "--out", str(out), *FAST, *TWO, "--method", method,
               "--setting", "continual", "--lora-rank", "4", "--dropout", "0", "--eval", "none"]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        logs[nproc] = [(e["loss"], e.get("penalty")) for e in log_of(out) if "loss" in e]
    assert len(logs[1]) == len(logs[2]) == 8
    for (l1, p1), (l2, p2) in zip(logs[1], logs[2]):
        assert l1 == pytest.approx(l2, rel=1e-5) and (p1 is None) == (p2 is None)
        assert p1 is None or p1 == pytest.approx(p2, rel=1e-5)
