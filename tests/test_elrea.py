"""ELREA (elrea.py): gradient features against a brute-force computation, the ensemble's decoding against
C + 1 separate models, its weights, the clustering and its size rule, and the pipeline end to end with a
resume after an interruption in every stage."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import elrea
import eval as evaluation
import runs
import train
from adapter_files import load_adapters, save_adapters
from badit import adapters_of
from methods import add_adapters
from conftest import interrupt_at, left_padded_batch
from data import CLASSROOM_TASKS, encode_examples, load_tasks
from hf import load_model, load_tokenizer
from model import generate

FAST = ["--data", "classroom", "--tasks", "sort_ascending,sort_descending,copy_words", "--limit", "8", "--batch-size", "4",
        "--epochs", "2", "--eval-limit", "3", "--max-new-tokens", "4", "--device", "cpu", "--dtype", "float32",
        "--method", "elrea", "--clusters", "2", "--proj-dim", "64"]


def lora_snapshots(path, folder: Path, steps=(2, 3)):
    """A tiny float32 model with a LoRA and two epoch-end-like checkpoints written by runs.save_checkpoint."""
    model = load_model(path, device="cpu", dtype=torch.float32)
    torch.manual_seed(0)
    add_adapters(model, "lora", dropout=0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape))
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    snapshots = []
    for i, n in enumerate(steps):
        for _ in range(n):
            for p in params:
                p.grad = torch.randn(p.shape)
            optimizer.step()
        snapshots.append(folder / f"epoch_{i + 1}")
        runs.save_checkpoint(model, optimizer, scheduler, dict(phase=0, epoch=i + 1, batch=0, step=n), snapshots[-1], 0, 1)
    return model, snapshots


def examples(path, n=6):
    tok = load_tokenizer(path)
    tasks = load_tasks("classroom", ["sort_ascending", "uppercase"], "train", limit=n // 2)
    return tok, encode_examples(tok, tasks, list(CLASSROOM_TASKS), 256, train=True)


def brute_force_feature(model, example, snapshots, proj_dim, seed, pad_id):
    """One example alone: autograd of its prompt loss written out, the Adam formula written out, and the
    whole Rademacher matrix materialised."""
    from safetensors.torch import load_file

    from adapter_files import load_adapter_state

    directions = []
    for folder in snapshots:
        load_adapter_state(model, folder / "adapter.safetensors")
        ids = torch.tensor([example.prompt_ids])
        logits = model(ids)[0]
        loss = F.cross_entropy(logits[:-1], ids[0, 1:])  # every prompt token predicts the next one
        params = [t for a in adapters_of(model).values() for t in (a.A, a.B)]
        g = torch.cat([x.flatten() for x in torch.autograd.grad(loss, params)])
        moments = load_file(folder / "trainer.safetensors")
        m = torch.cat([moments[f"optimizer.{i}.exp_avg"].flatten() for i in range(len(params))])
        v = torch.cat([moments[f"optimizer.{i}.exp_avg_sq"].flatten() for i in range(len(params))])
        b1, b2, eps = 0.9, 0.999, 1e-8  # AdamW's defaults, as the snapshots were written with
        directions.append((b1 * m + (1 - b1) * g) / (torch.sqrt(b2 * v + (1 - b2) * g**2) + eps))
    direction = sum(directions) / len(directions)
    p = direction.numel()
    R = torch.cat([elrea.rademacher_block(proj_dim, i, min(elrea.BLOCK, p - s), seed) for i, s in enumerate(range(0, p, elrea.BLOCK))], 1)
    assert R.shape == (proj_dim, p) and set(R.unique().tolist()) == {-1.0, 1.0}
    assert abs(R.mean().item()) < 0.01  # balanced signs
    return F.normalize(R @ direction / math.sqrt(proj_dim), dim=0)


def test_features_equal_a_brute_force_computation(tiny_trainable, tmp_path):
    model, snapshots = lora_snapshots(tiny_trainable, tmp_path)
    assert sum(a.A.numel() + a.B.numel() for a in adapters_of(model).values()) > 2 * elrea.BLOCK  # several blocks
    tok, ex = examples(tiny_trainable)
    features = elrea.gradient_features(model, ex, snapshots, proj_dim=32, seed=5, pad_id=tok.pad_token_id, batch_size=4)
    assert features.shape == (len(ex), 32)
    for i, e in enumerate(ex):
        torch.testing.assert_close(features[i], brute_force_feature(model, e, snapshots, 32, 5, tok.pad_token_id),
                                   atol=2e-5, rtol=0)
    alone = elrea.gradient_features(model, ex[::-1], snapshots, proj_dim=32, seed=5, pad_id=tok.pad_token_id, batch_size=1)
    torch.testing.assert_close(alone.flip(0), features, atol=2e-5, rtol=0)  # whatever batch an example is in


def test_ensemble_weights_on_hand_made_similarities():
    centroids = torch.eye(3)
    features = torch.tensor([[0.8, 0.6, 0.0], [0.0, 0.0, 1.0]])
    w = elrea.ensemble_weights(features, centroids)
    for row, s in zip(w, ([0.8, 0.6, 0.0], [0.0, 0.0, 1.0])):
        mean = sum(s) / 3
        std = math.sqrt(sum((x - mean) ** 2 for x in s) / 3)
        z = [(x - mean) / std for x in s]
        softmax = [math.exp(x) / sum(math.exp(y) for y in z) for x in z]
        assert row.tolist() == pytest.approx([1 - max(s)] + softmax, abs=1e-6)


def test_the_batched_ensemble_decodes_as_separate_models(tiny_trainable, tmp_path):
    """Greedy decoding of the stacked ensemble ((C + 1) x B rows, KV cache) equals C + 1 separately loaded
    models whose next-token logits are summed with the same weights (full forwards, no cache)."""
    members = []
    for k in range(3):
        model = load_model(tiny_trainable, device="cpu", dtype=torch.float32)
        torch.manual_seed(k)
        add_adapters(model, "lora", dropout=0.0)
        with torch.no_grad():
            for a in adapters_of(model).values():
                a.B.normal_(0, 0.3)
        save_adapters(model, tmp_path / f"m{k}")
        members.append(model)
    ensemble = load_model(tiny_trainable, device="cpu", dtype=torch.float32)
    elrea.stack_ensemble(ensemble, [tmp_path / f"m{k}" for k in range(3)], tmp_path)
    load_adapters(ensemble, tmp_path)
    ids, mask = left_padded_batch([9, 5, 7], vocab=200, seed=3)
    weights = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3], [0.0, 0.3, 0.7]])
    M, B = 3, len(ids)
    out = generate(ensemble, ids.repeat(M, 1), mask.repeat(M, 1), max_new_tokens=6,
                   task_ids=torch.arange(M).repeat_interleave(B), mix=elrea.mixer(weights))[:B]
    seq, full = ids, mask
    with torch.no_grad():
        for _ in range(6):
            logits = sum(weights[:, m, None] * members[m](seq, full)[:, -1] for m in range(M))
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
            full = torch.cat([full, torch.ones_like(full[:, :1])], 1)
    assert torch.equal(out, seq)
    single = generate(members[1], ids, mask, max_new_tokens=6)
    assert not torch.equal(single, seq)  # the mixture is not just one member


def planted(sizes, directions, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([directions[i] + noise * torch.randn(n, directions.shape[1], generator=g) for i, n in enumerate(sizes)])
    return F.normalize(x, dim=1), torch.arange(len(sizes)).repeat_interleave(torch.tensor(sizes))


def test_clusters_are_recovered_and_oversized_ones_split():
    from sklearn.metrics import adjusted_rand_score

    g = torch.Generator().manual_seed(1)
    d = F.normalize(torch.randn(4, 64, generator=g), dim=1)
    x, truth = planted([20, 25, 30], d[:3])
    labels, centroids = elrea.cluster_examples(x, 3, seed=0)
    assert adjusted_rand_score(truth, labels) == 1.0
    torch.testing.assert_close(centroids.norm(dim=1), torch.ones(3))

    close = F.normalize(d[0] + 0.35 * d[3], dim=0)  # two groups close enough for k = 3 to merge them ...
    x, truth = planted([20, 20, 5, 5], torch.stack([d[0], close, d[1], d[2]]), noise=0.02)
    merged, _ = elrea.spherical_kmeans(x, 3)
    assert sorted(torch.bincount(merged).tolist()) == [5, 5, 40]  # ... 40 is more than 5 x 5
    labels, centroids = elrea.cluster_examples(x, 3, seed=0)
    assert len(centroids) == 4 and adjusted_rand_score(truth, labels) == 1.0  # the size rule split it again

    x, truth = planted([30, 30, 30, 30, 1], torch.cat([d, F.normalize(d[0] - d[1], dim=0)[None]]), noise=0.02)
    labels, centroids = elrea.cluster_examples(x, 5, seed=0)  # one stray example: the rule applies 3 times ...
    assert len(centroids) == 5 + elrea.SIZE_ROUNDS  # ... one split each (splitting every large one made 29)
    for k in range(len(centroids)):  # a split never mixes the planted groups
        assert len(truth[labels == k].unique()) == 1


def run(model_dir, out, *extra):
    train.main(["--model", str(model_dir), "--out", str(out), *FAST, *extra])


def final(out):
    from safetensors.torch import load_file

    state = load_file(Path(out) / "adapter.safetensors")
    predictions = [json.loads(line) for line in (Path(out) / "metrics_test_predictions.jsonl").read_text().splitlines()]
    return state, predictions


def test_elrea_end_to_end(tiny_trainable, tmp_path, capsys):
    run(tiny_trainable, tmp_path / "run")
    record = json.loads((tmp_path / "run" / "elrea.json").read_text())
    assert sum(record["sizes"]) == 24 and record["clusters"] == len(record["sizes"]) >= 2
    assert sum(sum(mix.values()) for mix in record["task_mix"]) == 24
    assert {"base", "features"} <= set(record["seconds"])
    predictions = final(tmp_path / "run")[1]
    assert len(predictions) == 9 and all(set(p["weights"]) == {"base"} | {f"c{k}" for k in range(record["clusters"])} for p in predictions)
    for p in predictions:
        assert sum(v for k, v in p["weights"].items() if k != "base") == pytest.approx(1, abs=1e-5)
    evaluation.main(["evaluate", str(tmp_path / "run"), "--out", str(tmp_path / "again"), "--max-new-tokens", "4", "--limit", "3"])
    again = [json.loads(line) for line in (tmp_path / "again" / "metrics_eval_test_3_predictions.jsonl").read_text().splitlines()]
    assert [p["prediction"] for p in again] == [p["prediction"] for p in predictions]  # eval.py reads the run as train.py left it
    capsys.readouterr()
    evaluation.main(["compare", str(tmp_path / "run")])
    assert "| task | run (elrea) |" in capsys.readouterr().out  # tables label it elrea


def ctrl_c_in(monkeypatch, module, name, at_call=1):
    original, calls = getattr(module, name), []

    def interrupted(*args, **kw):
        calls.append(1)
        if len(calls) == at_call:
            raise KeyboardInterrupt
        return original(*args, **kw)

    monkeypatch.setattr(module, name, interrupted)


@pytest.mark.parametrize("stage", ["base", "features", "expert", "ensemble"])
def test_resume_after_an_interruption_in_each_stage(tiny_trainable, tmp_path, monkeypatch, stage):
    run(tiny_trainable, tmp_path / "full")
    if stage == "base":
        interrupt_at(monkeypatch, 3)  # step 3 of the base LoRA's 12
    elif stage == "features":
        ctrl_c_in(monkeypatch, elrea, "per_example_gradients", at_call=2)
    elif stage == "expert":
        interrupt_at(monkeypatch, 12 + 2)  # step 2 of the first expert
    else:
        ctrl_c_in(monkeypatch, elrea, "ensemble_weights")  # while the test queries are weighed
    with pytest.raises(SystemExit) as stop:
        run(tiny_trainable, tmp_path / "cut")
    assert stop.value.code == 130
    monkeypatch.undo()
    train.main(["--out", str(tmp_path / "cut"), "--resume"])
    (full_state, full_predictions), (cut_state, cut_predictions) = final(tmp_path / "full"), final(tmp_path / "cut")
    assert set(full_state) == set(cut_state) and all(torch.equal(full_state[k], cut_state[k]) for k in full_state)
    assert cut_predictions == full_predictions


def test_bad_elrea_input(tiny_trainable, tmp_path, capsys):
    from checks import command

    def refused(argv):
        with pytest.raises(SystemExit) as stop:
            command(lambda: train.main(["--model", str(tiny_trainable), *FAST, *argv]))
        assert stop.value.code == 2
        return capsys.readouterr().err

    assert "--clusters 30 is more than the 24 training examples" in refused(["--out", str(tmp_path / "a"), "--clusters", "30"])
    assert not (tmp_path / "a" / "base").exists()  # refused before the base LoRA
    assert "argument --proj-dim: 0 must be >= 1" in refused(["--out", str(tmp_path / "b"), "--proj-dim", "0"])
    assert "--setting continual is not defined for elrea" in refused(["--out", str(tmp_path / "c"), "--setting", "continual"])
    assert "--feature-epochs 3 must be at most --epochs 2" in refused(["--out", str(tmp_path / "d"), "--feature-epochs", "3"])
    run(tiny_trainable, tmp_path / "run")
    (tmp_path / "run" / "base" / "adapter.safetensors").unlink()
    with pytest.raises(SystemExit) as stop:
        command(lambda: train.main(["--out", str(tmp_path / "run"), "--resume"]))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "base/adapter.safetensors is missing although" in err and "features.safetensors exists" in err


def test_elrea_under_torchrun_does_not_depend_on_the_world_size(tiny_trainable, tmp_path):
    """Stages 1 and 4 data-parallel, the features on rank 0: the same clusters and predictions as one process."""
    import subprocess
    import sys

    from conftest import ROOT

    outs = {}
    for nproc in (1, 2):
        out = tmp_path / str(nproc)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(ROOT / "train.py"),
               "--model", str(tiny_trainable), "--out", str(out), *FAST, "--dropout", "0"]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        outs[nproc] = out
    records = [json.loads((outs[n] / "elrea.json").read_text()) for n in (1, 2)]
    assert records[0]["sizes"] == records[1]["sizes"] and records[0]["task_mix"] == records[1]["task_mix"]
    from safetensors.torch import load_file

    labels = [load_file(outs[n] / "clusters.safetensors")["labels"] for n in (1, 2)]
    assert torch.equal(labels[0], labels[1])
    predictions = [[p["prediction"] for p in final(outs[n])[1]] for n in (1, 2)]
    assert predictions[0] == predictions[1]


def test_features_carry_no_autograd_graph(tiny_trainable, tmp_path):
    """A graph on the features would keep every Rademacher block of the projection alive (24 GB on the demo
    model): the features are plain numbers."""
    model, snapshots = lora_snapshots(tiny_trainable, tmp_path)
    tok, ex = examples(tiny_trainable)
    g = elrea.per_example_gradients(model, elrea.collate(ex[:2], tok.pad_token_id, "cpu"))
    assert not g.requires_grad
    assert not elrea.gradient_features(model, ex, snapshots, 16, 0, tok.pad_token_id).requires_grad
