"""train.py and eval.py end to end on a tiny random model: every method, regrouping, resume,
Ctrl-C, a non-finite loss, the settings, and torchrun with two processes."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import eval as evaluation
import runs
import train
from adapter_files import adapter_state
from badit import REGROUP_STATS
from methods import METHODS, REGROUP_METHODS
from conftest import ROOT, cut_and_resume
from hf import load_model

FAST = ["--data", "classroom", "--tasks", "sort_ascending,sort_descending", "--limit", "8", "--batch-size", "4",
        "--epochs", "2", "--lr", "1e-3", "--eval-limit", "2", "--max-new-tokens", "4", "--device", "cpu", "--dtype", "float32"]


def run(model_dir, out, *extra):
    train.main(["--model", str(model_dir), "--out", str(out), *FAST, *extra])


def train_argv(model_dir, *extra):
    return ["--model", str(model_dir), *FAST, *extra]


def assert_len(items, n):
    assert len(items) == n


def log_of(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def losses(out):
    return [(e["step"], e["loss"]) for e in log_of(out) if "loss" in e]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_saves_and_evaluates(tiny_trainable, tmp_path, method):
    out = tmp_path / method
    run(tiny_trainable, out, "--method", method)
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == method and config["tasks"] == ["sort_ascending", "sort_descending"]
    steps = losses(out)
    assert len(steps) == 8 and all(torch.isfinite(torch.tensor(loss)) for _, loss in steps)
    regroups = [e for e in log_of(out) if "regroup" in e]
    assert len(regroups) == (1 if method in REGROUP_METHODS else 0)  # after epoch 1 of 2
    for name in ("metrics_before.json", "metrics_test.json", "metrics_test_predictions.jsonl", "adapter.safetensors"):
        assert (out / name).is_file()

    # the saved adapter loads onto a fresh base model and changes its function
    model, tok, cfg = evaluation.load_run(out)
    assert cfg["method"] == method
    trained = {k: v for k, v in adapter_state(model).items()}
    assert any(k.endswith(".B") and v.abs().sum() > 0 for k, v in trained.items())
    evaluation.main(["evaluate", str(out), "--out", str(tmp_path / "eval"), "--max-new-tokens", "4", "--limit", "2"])
    metrics = json.loads((tmp_path / "eval" / "metrics_eval_test_2.json").read_text())
    assert set(metrics["per_task"]) == {"sort_ascending", "sort_descending"}
    assert metrics["task_ids_used"] == (method == "cgc")
    predictions = [json.loads(line) for line in (tmp_path / "eval" / "metrics_eval_test_2_predictions.jsonl").open()]
    assert len(predictions) == 4 and all({"prompt", "references", "prediction"} <= set(p) for p in predictions)


@pytest.mark.parametrize("method", ["badit-nobad", "loramoe"])
def test_the_angle_diagnostic_changes_no_number_of_the_run(tiny_trainable, tmp_path, method):
    """--angles-every logs the experts' gradient angles, and the run is bitwise the run without it: losses,
    regroups, adapter, predictions."""
    extra = ["--method", method, "--epochs", "3", "--eval", "after"]
    run(tiny_trainable, tmp_path / "plain", *extra)
    run(tiny_trainable, tmp_path / "angles", *extra, "--angles-every", "2")
    assert losses(tmp_path / "angles") == losses(tmp_path / "plain")
    for a, b in zip(adapter_state_of(tmp_path / "plain"), adapter_state_of(tmp_path / "angles")):
        assert torch.equal(a, b)
    for name in ("metrics_test.json", "metrics_test_predictions.jsonl"):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "angles" / name).read_bytes()
    regroups = [[e["permutations"] for e in log_of(out) if "regroup" in e] for out in (tmp_path / "plain", tmp_path / "angles")]
    assert regroups[0] == regroups[1] and len(regroups[0]) == (1 if method == "badit-nobad" else 0)
    angles = [e for e in log_of(tmp_path / "angles") if "angles" in e]
    assert [e["step"] for e in angles] == list(range(2, 13, 2))  # 3 epochs of 4 steps, every 2nd step
    for e in angles:
        assert len(e["per_layer"]["layer"]) == len(e["per_layer"]["intra"]) == 3  # the tiny model's 3 gate_proj
        assert 0 < e["angles"]["intra"] < 180 and 0 < e["angles"]["inter"] < 180
    evaluation.main(["angles", str(tmp_path / "angles")])
    assert (tmp_path / "angles" / "figure4.csv").read_text().count("\n") == 7  # the header and 6 rows
    with pytest.raises(ValueError, match="is for loramoe, badit-noregroup, badit, badit-nobad only"):
        run(tiny_trainable, tmp_path / "lora", "--method", "lora", "--angles-every", "2")


@pytest.mark.parametrize("at_step", [2, 4])  # mid-epoch 1; at its end, after the regroup
def test_interrupt_and_resume_equal_an_uninterrupted_run(tiny_trainable, tmp_path, monkeypatch, at_step):
    extra = ["--method", "badit", "--epochs", "3", "--eval", "none"]
    run(tiny_trainable, tmp_path / "full", *extra)
    stopped_at = lambda: losses(tmp_path / "cut")  # noqa: E731  (the step under way finishes, then the checkpoint)
    cut_and_resume(monkeypatch, train_argv(tiny_trainable, *extra), tmp_path / "cut", at_step,
                   between=lambda: assert_len(stopped_at(), at_step))
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")  # bitwise, dropout included
    for a, b in zip(adapter_state_of(tmp_path / "full"), adapter_state_of(tmp_path / "cut")):
        assert torch.equal(a, b)


def adapter_state_of(out):
    from safetensors.torch import load_file

    state = load_file(Path(out) / "adapter.safetensors")
    return [state[k] for k in sorted(state)]


def test_sigint_to_a_subprocess_leaves_a_loadable_checkpoint(tiny_trainable, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, str(ROOT / "train.py"), "--model", str(tiny_trainable), "--out", str(out), *FAST,
            "--epochs", "1000", "--eval", "none"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "log.jsonl").is_file() and len(losses(out)) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output
    assert "checkpoint saved" in output and "--resume" in output
    position = json.loads((out / "checkpoint" / "trainer.json").read_text())
    assert position["step"] == len(losses(out))
    config = json.loads((out / "config.json").read_text())

    def loaded(num_experts):
        model = load_model(tiny_trainable, device="cpu", dtype=torch.float32)
        train.add_adapters(model, "badit", num_experts=num_experts, rank=config["rank"], init=True)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        return runs.load_checkpoint(model, optimizer, scheduler, out / "checkpoint", 0, 0), optimizer

    state, optimizer = loaded(config["num_experts"])  # the run's own K
    assert state["step"] == position["step"]
    assert len(optimizer.state) == 3 * 3  # A, B and the router G of three layers
    with pytest.raises(ValueError, match=r"layers.0.mlp.gate_proj.A \(24, 64\) against \(32, 64\) saved"):
        loaded(6)  # another K: the saved moments do not fit, and the error names them


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_trainable, tmp_path, capsys, monkeypatch):
    import data

    calls = []
    cross_entropy = data.F.cross_entropy

    def nan_at_step_2(*args, **kwargs):  # as an overflow in a forward pass would give
        calls.append(1)
        loss = cross_entropy(*args, **kwargs)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(data.F, "cross_entropy", nan_at_step_2)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        run(tiny_trainable, out, "--method", "lora", "--tasks", "sort_ascending", "--limit", "4", "--epochs", "3",
            "--eval", "none")
    assert stop.value.code == 1
    assert "non-finite loss (nan) at step 2" in capsys.readouterr().err
    assert len(losses(out)) == 1  # step 1 was finite; step 2 (epoch 2) was not and was not applied
    assert json.loads((out / "checkpoint" / "trainer.json").read_text())["step"] == 1
    assert all(torch.isfinite(t).all() for t in adapter_state_of(out / "checkpoint"))
    assert not (out / "adapter.safetensors").exists()


def test_single_and_continual_settings(tiny_trainable, tmp_path):
    run(tiny_trainable, tmp_path / "single", "--method", "lora", "--setting", "single", "--eval", "after")
    for task in ("sort_ascending", "sort_descending"):
        assert (tmp_path / "single" / task / "adapter.safetensors").is_file()
        assert json.loads((tmp_path / "single" / task / "config.json").read_text())["tasks"] == [task]
    single = json.loads((tmp_path / "single" / "metrics_test.json").read_text())
    assert set(single["per_task"]) == {"sort_ascending", "sort_descending"}

    run(tiny_trainable, tmp_path / "cont", "--method", "lora", "--setting", "continual", "--eval", "after")
    record = json.loads((tmp_path / "cont" / "continual.json").read_text())
    assert record["order"] == ["sort_ascending", "sort_descending"]  # order 1, the default: as listed
    assert json.loads((tmp_path / "cont" / "config.json").read_text())["order"] == 1
    assert len(record["rougeL"]) == 2 and all(len(row) == 2 for row in record["rougeL"])
    phases = [e["phase"] for e in log_of(tmp_path / "cont") if "loss" in e]
    assert phases == [0] * 4 + [1] * 4  # 8 examples per task: 2 steps per epoch, 2 epochs
    evaluation.main(["continual", str(tmp_path / "cont"), "--single", str(tmp_path / "single")])
    m = json.loads((tmp_path / "cont" / "continual_metrics.json").read_text())
    assert set(m) == {"AP", "Fgt", "Bwt", "Fwt"}
    evaluation.main(["compare", str(tmp_path / "single"), str(tmp_path / "cont")])


def torchrun_log(tiny_trainable, out, nproc):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "train.py"), "--model", str(tiny_trainable), "--out", str(out), *FAST,
           "--method", "badit", "--epochs", "2", "--dropout", "0", "--eval", "none"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return log_of(out)


def test_torchrun_two_processes_match_one(tiny_trainable, tmp_path):
    one = torchrun_log(tiny_trainable, tmp_path / "one", 1)
    two = torchrun_log(tiny_trainable, tmp_path / "two", 2)
    l1, l2 = [e["loss"] for e in one if "loss" in e], [e["loss"] for e in two if "loss" in e]
    assert len(l1) == len(l2) == 8
    assert l1 == pytest.approx(l2, rel=1e-5)
    r1, r2 = [e for e in one if "regroup" in e], [e for e in two if "regroup" in e]
    assert len(r2) == 1 and r2[0]["same_on_all_ranks"]
    assert r1[0]["permutations"] == r2[0]["permutations"]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def test_analysis_commands(tiny_trainable, tmp_path):
    out = tmp_path / "badit"
    run(tiny_trainable, out, "--method", "badit", "--epochs", "4", "--eval", "none")
    evaluation.main(["angles", str(out)])
    rows = (out / "angles.csv").read_text().splitlines()
    assert len(rows) == 1 + 2  # regroups after epochs 1 and 2 of 4
    assert rows[0].split(",")[3:] == list(REGROUP_STATS)
    layers = [line.split(",") for line in (out / "angles_layers.csv").read_text().splitlines()]
    assert len(layers) == 1 + 2 * 3 and {r[2] for r in layers[1:]} == {f"layers.{i}.mlp.gate_proj" for i in range(3)}
    J = {k: [float(r[layers[0].index(k)]) for r in layers[1:]] for k in ("J_kmeans", "J_end")}
    assert all(end >= start - 1e-6 for start, end in zip(J["J_kmeans"], J["J_end"]))  # per layer, in the log
    evaluation.main(["conflict", str(out), "--batches", "1", "--batch-size", "2"])
    matrix = [line.split(",") for line in (out / "conflict.csv").read_text().splitlines()]
    assert matrix[0][1:] == ["sort_ascending", "sort_descending"]
    assert float(matrix[1][1]) == pytest.approx(1.0) and -1 <= float(matrix[1][2]) < 1
    evaluation.main(["coactivation", str(out), "--batches", "1", "--batch-size", "2"])
    counts = [int(line.split(",")[1]) for line in (out / "coactivation.csv").read_text().splitlines()[1:]]
    assert len(counts) == 3 and sum(counts) == 3 * 3 * 2  # 3 layers of 96 x 64: 3 x 2 blocks of 32 x 32 each
    assert counts[1] + 2 * counts[2] == 2 * 3  # each task marks the top 10 % of each matrix's 6 blocks: one per matrix


def test_evaluate_base_only(tiny_trainable, tmp_path):
    evaluation.main(["evaluate", "--base-only", "--model", str(tiny_trainable), "--data", "classroom", "--tasks",
                     "uppercase,lowercase", "--limit", "3", "--max-new-tokens", "3", "--out", str(tmp_path)])
    metrics = json.loads((tmp_path / "metrics_base.json").read_text())
    assert {t: m["n"] for t, m in metrics["per_task"].items()} == {"uppercase": 3, "lowercase": 3}
    assert "| uppercase |" in (tmp_path / "metrics_base.md").read_text()


def test_regroup_schedule_and_learning_rate():
    import argparse

    args = argparse.Namespace(method="badit", regroup_every=None, regroup_until=0.5, epochs=10)
    assert [e + 1 for e in range(10) if train.regroup_due(args, e, 0, 5, True)] == [1, 2, 3, 4, 5]  # METHOD.md section 5.9
    assert not train.regroup_due(args, 0, 3, 5, end_of_epoch=False)
    args.regroup_every = 4
    assert [s for s in range(1, 51) if train.regroup_due(args, 0, s, 5, False)] == [4, 8, 12, 16, 20, 24]
    args.method = "badit-noregroup"
    assert not any(train.regroup_due(args, e, s, 5, True) for e in range(10) for s in range(50))
    lr = [train.cosine_with_warmup(s, 100, 0.03) for s in range(100)]
    assert lr[:4] == pytest.approx([1 / 3, 2 / 3, 1, 1]) and lr[50] == pytest.approx(0.5 * (1 + math.cos(math.pi * 47 / 97)))
    assert all(a >= b for a, b in zip(lr[2:], lr[3:])) and lr[-1] < 1e-3


def test_gradient_accumulation_equals_the_full_batch(tiny_trainable, tmp_path):
    extra = ["--method", "badit", "--dropout", "0", "--eval", "none"]
    run(tiny_trainable, tmp_path / "full", *extra)
    run(tiny_trainable, tmp_path / "accum", *extra, "--grad-accum", "2")
    assert [loss for _, loss in losses(tmp_path / "accum")] == pytest.approx([loss for _, loss in losses(tmp_path / "full")], rel=1e-5)
    permutations = lambda out: [e["permutations"] for e in log_of(out) if "regroup" in e]  # noqa: E731
    assert permutations(tmp_path / "accum") == permutations(tmp_path / "full")


def test_continual_resume_after_an_interrupt_in_the_second_task(tiny_trainable, tmp_path, monkeypatch):
    extra = ["--method", "badit", "--setting", "continual", "--eval", "after"]
    run(tiny_trainable, tmp_path / "full", *extra)

    def stopped_in_task_2():
        assert len(json.loads((tmp_path / "cut" / "continual.json").read_text())["rougeL"]) == 1
        assert [e["phase"] for e in log_of(tmp_path / "cut") if "loss" in e] == [0, 0, 0, 0, 1, 1]

    cut_and_resume(monkeypatch, train_argv(tiny_trainable, *extra), tmp_path / "cut", 4 + 2,  # step 2 of task 2
                   between=stopped_in_task_2)
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    full, cut = (json.loads((tmp_path / d / "continual.json").read_text()) for d in ("full", "cut"))
    assert cut == full


# ---------------------------------------------------------------------------------------------- determinism


def test_the_regroup_signal_restarts_with_each_continual_task(tiny_trainable, tmp_path, monkeypatch):
    """METHOD.md section 5: a new task of the continual setting starts its signal from zero, so the first regroup
    of task 2 clusters task 2's gradients only."""
    import badit

    steps, seen = [], []  # every optimizer step's z (signal_last), and the signal at every regroup
    accumulate, regroup = badit.accumulate_regroup_signal, badit.regroup

    def record_step(model):
        accumulate(model)
        steps.append({n: a.signal_last.clone() for n, a in badit.routed_adapters(model).items()})

    def record_regroup(model, *args, **kw):
        seen.append((len(steps), {n: a.signal_sum.clone() for n, a in badit.routed_adapters(model).items()}))
        return regroup(model, *args, **kw)

    monkeypatch.setattr(train, "accumulate_regroup_signal", record_step)
    monkeypatch.setattr(train, "regroup", record_regroup)
    run(tiny_trainable, tmp_path / "cont", "--method", "badit", "--setting", "continual", "--eval", "none")
    assert [n for n, _ in seen] == [2, 6]  # after epoch 1 of each task: 2 steps per epoch, 4 per task
    for n, z in seen[1][1].items():  # task 2's regroup: its own 2 steps (5 and 6), nothing of task 1
        torch.testing.assert_close(z, steps[4][n] + steps[5][n], atol=1e-6, rtol=0)


def test_a_single_task_adapter_depends_only_on_seed_and_task(tiny_trainable, tmp_path):
    """--setting single: each task's adapter starts from (seed, task) alone, whatever ran before it."""
    run(tiny_trainable, tmp_path / "both", "--method", "lora", "--setting", "single", "--eval", "none")  # random init
    run(tiny_trainable, tmp_path / "one", "--method", "lora", "--setting", "single", "--eval", "none",
        "--tasks", "sort_descending")
    assert losses(tmp_path / "both" / "sort_descending") == losses(tmp_path / "one" / "sort_descending")
    for a, b in zip(adapter_state_of(tmp_path / "both" / "sort_descending"), adapter_state_of(tmp_path / "one" / "sort_descending")):
        assert torch.equal(a, b)


def test_resume_rebuilds_the_residual_from_the_saved_components(tiny_trainable, tmp_path, monkeypatch):
    """A resume must not redo the SVD (another machine's or library's SVD need not be bitwise equal):
    with a perturbed SVD at resume the run still continues exactly."""
    extra = ["--method", "badit", "--epochs", "3", "--eval", "none"]
    run(tiny_trainable, tmp_path / "full", *extra)
    svd = torch.linalg.svd

    def perturbed_svd(W, **kw):
        U, S, Vh = svd(W, **kw)
        return U, S * 1.001, Vh

    cut_and_resume(monkeypatch, train_argv(tiny_trainable, *extra), tmp_path / "cut", 3,
                   between=lambda: monkeypatch.setattr(torch.linalg, "svd", perturbed_svd))
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")


def faulty_torchrun(tiny_trainable, out, nproc, *faults, extra=(), resume=False):
    """train.py under torchrun with faults (tests/faults.py) -> (return code, output)."""
    args = ["--out", str(out), "--resume"] if resume else ["--model", str(tiny_trainable), "--out", str(out), *FAST, *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "tests" / "faults.py"), *faults, *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return result.returncode, result.stdout[-3000:] + result.stderr[-3000:]


def test_single_setting_under_torchrun_matches_one_process(tiny_trainable, tmp_path):
    extra = ["--method", "lora", "--setting", "single", "--dropout", "0", "--eval", "none"]  # lora: a random init
    for nproc in (1, 2):
        code, output = faulty_torchrun(tiny_trainable, tmp_path / str(nproc), nproc, "ranks", extra=extra)
        assert code == 0, output
    for task in ("sort_ascending", "sort_descending"):
        one, two = losses(tmp_path / "1" / task), losses(tmp_path / "2" / task)
        assert [s for s, _ in one] == [s for s, _ in two]
        assert [v for _, v in one] == pytest.approx([v for _, v in two], rel=1e-5)
        ranks = [adapter_state_of_file(tmp_path / "2" / task / f"rank{r}.safetensors") for r in (0, 1)]
        assert all(torch.equal(a, b) for a, b in zip(*ranks))  # both ranks trained the same model


def adapter_state_of_file(file):
    from safetensors.torch import load_file

    state = load_file(file)
    return [state[k] for k in sorted(state)]


def test_resume_under_torchrun_restores_every_ranks_rng(tiny_trainable, tmp_path):
    extra = ["--method", "badit", "--epochs", "3", "--eval", "none"]  # dropout 0.05: each rank's stream matters
    code, output = faulty_torchrun(tiny_trainable, tmp_path / "full", 2, extra=extra)
    assert code == 0, output
    code, output = faulty_torchrun(tiny_trainable, tmp_path / "cut", 2, "interrupt@3", extra=extra)
    assert code != 0 and "checkpoint saved" in output, output
    assert len(losses(tmp_path / "cut")) == 3
    code, output = faulty_torchrun(tiny_trainable, tmp_path / "cut", 2, resume=True)
    assert code == 0, output
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    assert all(torch.equal(a, b) for a, b in zip(adapter_state_of(tmp_path / "full"), adapter_state_of(tmp_path / "cut")))


def test_ranks_that_cluster_differently_apply_rank_0s_permutation(tiny_trainable, tmp_path):
    extra = ["--method", "badit", "--epochs", "2", "--eval", "none"]
    code, output = faulty_torchrun(tiny_trainable, tmp_path / "run", 2, "disagree", "ranks", extra=extra)
    assert code == 0, output
    regroups = [e for e in log_of(tmp_path / "run") if "regroup" in e]
    assert len(regroups) == 1 and regroups[0]["same_on_all_ranks"] is False
    ranks = [adapter_state_of_file(tmp_path / "run" / f"rank{r}.safetensors") for r in (0, 1)]
    assert all(torch.equal(a, b) for a, b in zip(*ranks))  # the ranks still hold one model


def test_no_import_cycles():
    """the error type and file rules, then data and model at the bottom, the method above them, the loop above
    that (README, Layout):
    no module imports one above it, not even inside a function."""
    import ast

    layers = ["checks", "files", "data", "model", "hf", "routing", "badit", "methods", "adapter_files", "continual", "elrea",
              "eval", "runs", "train", "study"]
    for i, name in enumerate(layers):
        file = ROOT / f"{name}.py"
        if not file.is_file():
            continue
        imported = {n.module if isinstance(n, ast.ImportFrom) else a.name
                    for n in ast.walk(ast.parse(file.read_text())) if isinstance(n, (ast.Import, ast.ImportFrom))
                    for a in (n.names if isinstance(n, ast.Import) else [None])}
        assert not imported & set(layers[i:]), f"{name}.py imports {imported & set(layers[i:])}"


# ---------------------------------------------------------------------------------------------- precision


def native_cpu_bf16():
    from hf import native_bf16

    if native_bf16(torch.device("cpu")) is None:
        pytest.skip("this CPU has no native bf16 matrix instructions: the default there is float32")


def one_step_keeps_float32_state(model_dir, device: str):
    """METHOD.md section 8: one badit step with bf16 weights (autocast) and one with float32 weights on `device`:
    adapter parameters, their gradients, AdamW state, router gates and loss are float32 in both."""
    import data
    from badit import routed_adapters
    from methods import add_adapters

    losses_by_dtype = {}
    for dtype in (torch.bfloat16, torch.float32):
        model = load_model(model_dir, device=device, dtype=dtype)
        torch.manual_seed(0)
        add_adapters(model, "badit", dropout=0.0)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        tok = train.load_tokenizer(model_dir)
        ex = data.encode_examples(tok, data.load_tasks("classroom", ["sort_ascending"], "train", 4), ["sort_ascending"], 256)
        x = data.collate(ex, tok.pad_token_id, device)
        loss = data.answer_loss(model, x) / x["answer"].sum()
        loss.backward()
        optimizer.step()
        losses_by_dtype[dtype] = loss.item()
        assert model.layers[0].mlp.gate_proj.base.weight.dtype == dtype and loss.dtype == torch.float32
        assert all(p.device.type == device and p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in params)
        assert all(v.dtype == torch.float32 for s in optimizer.state.values() for k, v in s.items() if k != "step")
        assert model.routing.gates() and all(g.dtype == torch.float32 for g in model.routing.gates())  # the gates
        assert all(a.G.dtype == torch.float32 for a in routed_adapters(model).values())
    # the same step in bf16 and float32: the loss agrees to bf16's precision (8 bits of mantissa, 30 matmuls deep)
    assert losses_by_dtype[torch.bfloat16] == pytest.approx(losses_by_dtype[torch.float32], rel=2e-2)


def test_the_default_precision_keeps_adapters_optimizer_router_and_loss_in_float32(tiny_trainable, tmp_path):
    """METHOD.md section 8: on a CPU with native bf16 the default is bf16 weights + autocast, with float32
    adapter parameters, optimizer state, router softmax and loss."""
    native_cpu_bf16()
    argv = [a for a in FAST if a not in ("--dtype", "float32")]
    train.main(["--model", str(tiny_trainable), "--out", str(tmp_path / "run"), *argv, "--eval", "none", "--method", "badit"])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["precision"].startswith("bf16: native on this CPU")

    one_step_keeps_float32_state(tiny_trainable, "cpu")


def test_resume_is_bitwise_in_bf16(tiny_trainable, tmp_path, monkeypatch):
    native_cpu_bf16()
    extra = ["--method", "badit", "--epochs", "3", "--eval", "none", "--dtype", "bfloat16"]
    run(tiny_trainable, tmp_path / "full", *extra)
    cut_and_resume(monkeypatch, train_argv(tiny_trainable, *extra), tmp_path / "cut", 3)
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    assert all(torch.equal(a, b) for a, b in zip(adapter_state_of(tmp_path / "full"), adapter_state_of(tmp_path / "cut")))


def test_micro_batches_split_uneven_batches_by_length():
    class Row:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

    def split(lengths, most=8, call_cost=64):
        return [[len(r) for r in part] for part in train.micro_batches([Row(n) for n in lengths], most, call_cost)]

    assert split([45, 30, 44, 40, 38, 36, 35, 33]) == [[45, 44, 40, 38, 36, 35, 33, 30]]  # even: one call
    assert split([100, 500, 95, 490, 90, 80, 30, 20]) == [[500, 490], [100, 95, 90, 80], [30, 20]]  # uneven: by length
    assert split([500, 490, 100, 95], call_cost=2048) == [[500, 490, 100, 95]]  # a dear call (GPU): one
    assert all(len(p) <= 3 for p in split([40] * 8, most=3))  # --grad-accum's bound holds
    import itertools
    import random

    cost = lambda parts: sum(len(p) * max(p) for p in parts) + 64 * len(parts)  # noqa: E731
    rng = random.Random(0)
    for _ in range(20):  # the dynamic program's split is the cheapest of every split of the sorted rows
        rows = sorted((rng.randint(10, 500) for _ in range(8)), reverse=True)
        cheapest = min(cost([rows[a:b] for a, b in zip((0,) + cuts, cuts + (8,))])
                       for k in range(8) for cuts in itertools.combinations(range(1, 8), k))
        assert cost(split(rows)) == cheapest
