"""study.py: the paired test, the summary against a direct computation from the cells' files, and a tiny
study through the driver, killed mid-cell and restarted."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import study
from eval import continual_metrics
from conftest import ROOT


def test_paired_permutation_test_known_values():
    # [1, 2, 3]: of the 8 sign flips only all-plus and all-minus reach |mean| = 2
    assert study.paired_permutation_test([1, 2, 3]) == pytest.approx(2 / 8)
    assert study.paired_permutation_test([1, -1, 1, -1]) == 1.0
    # 20 equal positive differences: only 2 of 2^20 flips reach the mean; the sampled p is near 0
    assert study.paired_permutation_test([0.5] * 20) < 1e-3
    noise = np.random.default_rng(0).normal(0, 1, 24)
    assert study.paired_permutation_test(noise) > 0.05


def test_the_cell_bar_times_each_task_phase_and_resume_from_its_own_start(tmp_path):
    written = []

    def log(folder, *entries, partial=""):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        file = tmp_path / folder / "log.jsonl"
        file.write_text("".join(json.dumps(e) + "\n" for e in entries) + partial)
        written.append(file)
        os.utime(file, (len(written), len(written)))  # the newest log is found by modification time

    def steps(phase, first, last):
        return [dict(phase=phase, step=s, loss=1.0) for s in range(first + 1, last + 1)]

    assert study.progress(tmp_path) == (None, 0, 0, 0)
    # a run resumed at step 26 of 180, its last line half written
    log(".", dict(phase=0, step=0, total_steps=180), *steps(0, 0, 26), dict(phase=0, step=26, total_steps=180),
        *steps(0, 26, 30), partial='{"phase": 0, "st')
    assert study.progress(tmp_path) == (("", 2), 26, 30, 180)
    # single-task runs: the newest task's folder; continual: the phase after the first
    log("task_a", dict(phase=0, step=0, total_steps=12), *steps(0, 0, 12))
    log("task_b", dict(phase=0, step=0, total_steps=12), *steps(0, 0, 5))
    assert study.progress(tmp_path) == (("task_b", 1), 0, 5, 12)
    log("task_c", dict(phase=0, step=0, total_steps=12), *steps(0, 0, 12), dict(phase=1, step=0, total_steps=12))
    assert study.progress(tmp_path) == (("task_c phase 2", 2), 0, 0, 12)


def test_a_checkpoint_vanishing_under_the_progress_glob_does_not_stop_the_study(tmp_path, monkeypatch):
    # train.py renames checkpoint.new into place while the study globs the run for log.jsonl
    calls = []

    def progress(run):
        calls.append(run)
        if len(calls) == 1:
            raise FileNotFoundError(run / "checkpoint.new")
        return ("", 1), 0, 3, 12

    monkeypatch.setattr(study, "progress", progress)
    cell = study.Cell(id="c", method="lora", seed=0)
    bar = study.tqdm(total=0, disable=True)
    (tmp_path / "logs").mkdir()
    study.run_commands(cell, [[sys.executable, "-c", "import time; time.sleep(2.5)"]], tmp_path / "logs", tmp_path, bar)
    assert len(calls) >= 2 and (bar.n, bar.total) == (3, 12)


def write_cell(results, id, method, seed, setting="mtl", variant="", scores=None):
    folder = results / "cells" / id
    folder.mkdir(parents=True)
    cell = dict(id=id, method=method, seed=seed, setting=setting, variant=variant, flags=[], kind="train", of="", seconds=60.0)
    (folder / "cell.json").write_text(json.dumps(cell))
    per_task = {t: {"rougeL": s, "exact_match": 0.0, "n": 4} for t, s in scores.items()}
    (folder / "metrics_test.json").write_text(json.dumps({"per_task": per_task, "rougeL": float(np.mean(list(scores.values()))),
                                                          "exact_match": 0.0}))
    return cell


def test_the_summary_equals_a_direct_computation(tmp_path):
    rng = np.random.default_rng(1)
    cells = []
    for method in ("lora", "badit"):
        for seed in (0, 1, 2):
            for setting in ("mtl", "single"):
                scores = {t: float(rng.uniform(20, 90)) for t in ("a", "b")}
                suffix = "" if setting == "mtl" else "-single"
                cells.append(write_cell(tmp_path, f"{method}{suffix}-s{seed}", method, seed, setting, scores=scores))
    for seed in (0, 1):  # a variant (two seeds only) is compared with its own method on the seeds they share
        scores = {t: float(rng.uniform(20, 90)) for t in ("a", "b")}
        cells.append(write_cell(tmp_path, f"badit-float32-s{seed}", "badit", seed, variant="float32", scores=scores))
    # a continual run of lora at seed 0, tasks in the order b, a: Fwt against lora's single-task run at seed 0
    matrix = [[30.0, 70.0], [25.0, 60.0]]  # a[j][i]: after the j-th task, on the i-th task of the order
    cells.append(write_cell(tmp_path, "lora-continual-s0", "lora", 0, "continual", scores={"a": 60.0, "b": 25.0}))
    (tmp_path / "cells" / "lora-continual-s0" / "continual.json").write_text(json.dumps({"order": ["b", "a"], "rougeL": matrix}))
    (tmp_path / "study.json").write_text(json.dumps({"command": "python study.py test", "flags": [], "reference": "lora", "cells": cells}))
    s = study.summarise(tmp_path)
    read = lambda id: json.loads((tmp_path / "cells" / id / "metrics_test.json").read_text())  # noqa: E731
    for method in ("lora", "badit"):
        mtl = [read(f"{method}-s{seed}") for seed in (0, 1, 2)]
        single = [read(f"{method}-single-s{seed}") for seed in (0, 1, 2)]
        row = s["rows"][method]
        assert row["per_task"]["a"] == [m["per_task"]["a"]["rougeL"] for m in mtl]
        assert np.mean(row["average"]) == pytest.approx(np.mean([m["rougeL"] for m in mtl]))
        assert np.std(row["average"], ddof=1) == pytest.approx(np.std([m["rougeL"] for m in mtl], ddof=1))
        assert row["colla"] == pytest.approx([m["rougeL"] - x["rougeL"] for m, x in zip(mtl, single)])
    diffs = [read(f"badit-s{seed}")["per_task"][t]["rougeL"] - read(f"lora-s{seed}")["per_task"][t]["rougeL"]
             for seed in (0, 1, 2) for t in ("a", "b")]
    against = s["rows"]["badit"]["against_reference"]
    assert against["pairs"] == 6 and against["mean_difference"] == pytest.approx(np.mean(diffs))
    assert against["p"] == pytest.approx(study.paired_permutation_test(diffs))
    diffs = [read(f"badit-float32-s{seed}")["per_task"][t]["rougeL"] - read(f"badit-s{seed}")["per_task"][t]["rougeL"]
             for seed in (0, 1) for t in ("a", "b")]
    against = s["rows"]["badit [float32]"]["against_method"]
    assert against["pairs"] == 4 and against["mean_difference"] == pytest.approx(np.mean(diffs))
    assert "against_method" not in s["rows"]["badit"]
    single = read("lora-single-s0")["per_task"]
    expected = continual_metrics(matrix, [single["b"]["rougeL"], single["a"]["rougeL"]])
    assert s["continual"]["lora (seed 0)"] == pytest.approx(expected) and "Fwt" in expected
    text = study.markdown("test", s)
    assert f"| lora (seed 0) | {expected['AP']:.1f} | {expected['Fgt']:.1f} | {expected['Fwt']:.1f} | {expected['Bwt']:.1f} |" in text
    # two shared seeds are an anecdote whatever p says (the variant against lora and against badit); three get the test's reading
    assert "| badit [float32] | 4 |" in text and text.count("2 seeds: an anecdote, not a comparison") == 2
    assert "| badit | 6 |" in text and "anecdote" not in next(line for line in text.splitlines() if line.startswith("| badit | 6 |"))
    assert against["seeds"] == 2 and s["rows"]["badit"]["against_reference"]["seeds"] == 3
    mean = np.mean([m["rougeL"] for m in (read(f"badit-s{seed}") for seed in (0, 1, 2))])
    assert f"**{mean:.1f} ± " in text and "colla" in text
    # the single-task runs against the reference's, task by task at the same seed (the reference is not tested against itself)
    diffs = [read(f"badit-single-s{seed}")["per_task"][t]["rougeL"] - read(f"lora-single-s{seed}")["per_task"][t]["rougeL"]
             for seed in (0, 1, 2) for t in ("a", "b")]
    single_against = s["rows"]["badit"]["single_against"]["lora"]
    assert single_against["pairs"] == 6 and single_against["seeds"] == 3
    assert single_against["mean_difference"] == pytest.approx(np.mean(diffs))
    assert single_against["p"] == pytest.approx(study.paired_permutation_test(diffs))
    assert "single_against" not in s["rows"]["lora"] and f"| badit against lora | 6 | {np.mean(diffs):+.2f} |" in text


def test_continual_rows_over_orders_equal_a_direct_computation(tmp_path):
    """Orders vary like seeds: per method, AP / Fgt over (order, seed) with their spread, and against the reference
    the paired test over (order, seed) x tasks of the final scores and of the forgetting."""
    rng = np.random.default_rng(2)
    cells, matrices = [], {}
    for method in ("lora", "gainlora", "badit"):
        cells.append(write_cell(tmp_path, f"{method}-s0", method, 0, scores={"a": 50.0, "b": 50.0, "c": 50.0}))
        for order in (1, 2, 3):
            id = f"{method}-continual-o{order}-s0"
            tasks = ["a", "b", "c"] if order != 2 else ["c", "b", "a"]
            a = rng.uniform(10, 90, (3, 3)).round(1).tolist()
            matrices[method, order] = (tasks, a)
            cell = write_cell(tmp_path, id, method, 0, "continual", scores=dict(zip(tasks, a[-1])))
            cell["order"] = order
            (tmp_path / "cells" / id / "cell.json").write_text(json.dumps(cell))
            (tmp_path / "cells" / id / "continual.json").write_text(json.dumps({"order": tasks, "rougeL": a}))
            cells.append(cell)
    (tmp_path / "study.json").write_text(json.dumps({"command": "python study.py t", "flags": [], "reference": "lora", "cells": cells}))
    s = study.summarise(tmp_path)
    for method in ("lora", "badit"):
        r = s["continual_rows"][method]
        assert r["AP"] == pytest.approx([continual_metrics(matrices[method, o][1])["AP"] for o in (1, 2, 3)])
        assert r["Fgt"] == pytest.approx([continual_metrics(matrices[method, o][1])["Fgt"] for o in (1, 2, 3)])
    against = s["continual_rows"]["badit"]
    for other, suffix in (("lora", "reference"), ("gainlora", "gainlora")):  # the reference, and the continual state of the art
        final, forgetting = [], []
        for order in (1, 2, 3):
            (tasks, ours), (same, theirs) = matrices["badit", order], matrices[other, order]
            assert tasks == same
            for i in range(3):
                final.append(ours[-1][i] - theirs[-1][i])
                if i < 2:
                    forget = lambda a: max(a[j][i] for j in range(i, 2)) - a[-1][i]  # noqa: E731
                    forgetting.append(forget(ours) - forget(theirs))
        assert against[f"final_against_{suffix}"]["pairs"] == 9 and against[f"forgetting_against_{suffix}"]["pairs"] == 6
        assert against[f"final_against_{suffix}"]["mean_difference"] == pytest.approx(np.mean(final))
        assert against[f"forgetting_against_{suffix}"]["p"] == pytest.approx(study.paired_permutation_test(forgetting))
    assert "final_against_reference" in s["continual_rows"]["gainlora"]
    assert "final_against_gainlora" not in s["continual_rows"]["gainlora"] | s["continual_rows"]["lora"]
    text = study.markdown("t", s)
    assert "| badit (order 2, seed 0) |" in text and "| badit: forgetting | 6 |" in text
    forgetting = against["forgetting_against_reference"]
    row = next(line for line in text.splitlines() if line.startswith("| badit: forgetting | 6 |"))
    if forgetting["p"] < 0.05:  # in the table too, less forgetting than lora reads as better
        assert ("better" if forgetting["mean_difference"] < 0 else "worse") + " than lora" in row
    assert "Against `gainlora`, paired over (order, seed) x tasks" in text
    assert f"| badit | 3 | {np.mean(against['AP']):.1f} ± " in text


def test_the_readings_name_what_they_count():
    """A continual row counts runs over (order, seed), not seeds: one run is one run, two are an anecdote."""
    a = {"pairs": 30, "seeds": 2, "mean_difference": -5.28, "p": 0.024}
    assert "2 runs (order, seed): an anecdote" in study.paired_row("x", a, "lora", runs="runs (order, seed)")
    assert "1 run (order, seed): an anecdote" in study.paired_row("x", a | {"seeds": 1}, "lora", runs="runs (order, seed)")
    assert "1 seed: an anecdote" in study.paired_row("x", a | {"seeds": 1}, "lora")
    assert "worse than lora (p < 0.05)" in study.paired_row("x", a | {"seeds": 3}, "lora", runs="runs (order, seed)")
    assert study.mean_std([29.5], "run") == "29.5 (1 run)" and study.mean_std([29.5, 28.5]) == "29.0 ± 0.7"


def test_a_study_with_only_continual_runs_finished_shows_them(tmp_path):
    """superni-paper runs its sequential cells before its joint ones: with the base model and continual runs
    finished and no joint run, the summary still has the continual table (it once said only the base had run)."""
    base = tmp_path / "cells" / "base"
    base.mkdir(parents=True)
    (base / "cell.json").write_text(json.dumps(dict(id="base", method="base", seed=0, setting="mtl", variant="", flags=[],
                                                    kind="base", of="", seconds=5.0)))
    (base / "metrics_base.json").write_text(json.dumps({"per_task": {"a": {"rougeL": 7.0}, "b": {"rougeL": 9.0}},
                                                        "rougeL": 8.0, "exact_match": 0.0}))
    cells = [json.loads((base / "cell.json").read_text())]
    matrix = [[30.0, 12.0], [20.0, 60.0]]
    cell = write_cell(tmp_path, "lora-continual-o1-s0", "lora", 0, "continual", scores={"a": 20.0, "b": 60.0})
    cell["order"] = 1
    (tmp_path / "cells" / cell["id"] / "cell.json").write_text(json.dumps(cell))
    (tmp_path / "cells" / cell["id"] / "continual.json").write_text(json.dumps({"order": ["a", "b"], "rougeL": matrix}))
    (tmp_path / "study.json").write_text(json.dumps({"command": "python study.py t", "flags": [], "reference": "lora",
                                                     "cells": cells + [cell]}))
    text = study.markdown("t", study.summarise(tmp_path))
    expected = continual_metrics(matrix)
    assert f"| lora (order 1, seed 0) | {expected['AP']:.1f} | {expected['Fgt']:.1f} |" in text
    assert "average ROUGE-L 8.0" in text and "no joint run has finished yet" in text


def test_less_forgetting_reads_as_better():
    """A paired difference in forgetting (lower is better) reads the other way round from one in scores."""
    more = {"seeds": 3, "pairs": 21, "mean_difference": 6.2, "p": 0.02}
    less = {**more, "mean_difference": -6.2}
    assert "worse than lora" in study.paired_row("badit: forgetting", more, "lora", lower_is_better=True)
    assert "better than lora" in study.paired_row("gainlora: forgetting", less, "lora", lower_is_better=True)
    assert "better than lora" in study.paired_row("badit: final score", more, "lora")


TINY = ["--data", "classroom", "--tasks", "sort_ascending,sort_descending", "--limit", "8", "--batch-size", "4",
        "--epochs", "3", "--eval-limit", "2", "--max-new-tokens", "4", "--dtype", "float32"]


def run_study(tiny_trainable, base, wait_for_step=None):
    cmd = [sys.executable, str(ROOT / "study.py"), "tiny", "--dir", str(base), "--methods", "lora,badit", "--seeds", "0,1",
           "--single", "--", "--model", str(tiny_trainable), *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if wait_for_step is None:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        return
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    log = base / "studies" / "tiny" / "badit-s0" / "log.jsonl"  # the third cell
    deadline = time.time() + 300
    while time.time() < deadline and not (log.is_file() and log.read_text().count('"loss"') >= wait_for_step):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # as a Ctrl-C to the study
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "run `python study.py tiny" in err


@pytest.mark.slow
def test_a_tiny_study_survives_being_stopped_mid_cell(tiny_trainable, tmp_path):
    run_study(tiny_trainable, tmp_path / "whole")
    run_study(tiny_trainable, tmp_path / "cut", wait_for_step=2)
    ckpt = tmp_path / "cut" / "studies" / "tiny" / "badit-s0" / "checkpoint" / "trainer.json"
    assert ckpt.is_file() and not (tmp_path / "cut" / "studies" / "tiny" / "badit-s0" / "metrics_test.json").exists()
    run_study(tiny_trainable, tmp_path / "cut")
    summaries = [json.loads((tmp_path / d / "results" / "tiny" / "summary.json").read_text()) for d in ("whole", "cut")]
    for s in summaries:
        for row in s["rows"].values():
            row.pop("seconds")
    assert summaries[0] == summaries[1]
    # a fresh clone holds the committed results but not the runs: the study keeps them and reruns nothing
    (tmp_path / "whole" / "studies").rename(tmp_path / "whole" / "runs-elsewhere")
    before = (tmp_path / "whole" / "results" / "tiny" / "summary.json").read_text()
    run_study(tiny_trainable, tmp_path / "whole")
    assert not list((tmp_path / "whole" / "studies" / "tiny").glob("*/config.json"))
    assert (tmp_path / "whole" / "results" / "tiny" / "summary.json").read_text() == before
    assert set(summaries[0]["rows"]) == {"lora", "badit"} and summaries[0]["rows"]["badit"]["colla"]
    cells = sorted(p.name for p in (tmp_path / "cut" / "results" / "tiny" / "cells").iterdir())
    assert cells == sorted(f"{m}{s}-s{seed}" for m in ("lora", "badit") for s in ("", "-single") for seed in (0, 1))
    assert not list((tmp_path / "cut" / "results").rglob("*.safetensors"))  # no adapters in results/
    text = (tmp_path / "cut" / "results" / "tiny" / "summary.md").read_text()
    assert text.startswith("# Study `tiny`") and "Command: `python study.py tiny --methods lora,badit" in text


def test_the_pictures_and_the_angles_over_training(tmp_path):
    """A summary with joint, sequential and --angles-every cells: each row's angles per seed as the cells recorded
    them, each sequential cell's accuracy matrix, and (with matplotlib) the pictures: scores, Figure 4, the matrices
    and the average after each task."""
    rng = np.random.default_rng(0)
    cells = []
    for method in ("lora", "badit-nobad", "badit"):
        for seed in (0, 1):
            score = {"lora": 40.0, "badit-nobad": 42.0, "badit": 45.0}[method] + seed
            cell = write_cell(tmp_path, f"{method}-s{seed}", method, seed, scores={"a": score, "b": 60.0})
            if method == "badit-nobad":
                angles = [{"phase": 0, "step": s, "intra": 80.0 - s, "inter": 90.0 + seed} for s in (4, 8)]
                (tmp_path / "cells" / cell["id"] / "curve.json").write_text(json.dumps({"loss": [1.0], "regroups": [],
                                                                                       "angles": angles}))
            cells.append(cell)
        id = f"{method}-continual-o1-s0"
        a = rng.uniform(0, 100, (2, 2)).round(1).tolist()
        cell = dict(write_cell(tmp_path, id, method, 0, "continual", scores={"a": a[-1][0], "b": a[-1][1]}), order=1)
        (tmp_path / "cells" / id / "cell.json").write_text(json.dumps(cell))
        (tmp_path / "cells" / id / "continual.json").write_text(json.dumps({"order": ["a", "b"], "rougeL": a}))
        cells.append(cell)
    (tmp_path / "study.json").write_text(json.dumps({"command": "python study.py t", "flags": [], "reference": "lora",
                                                     "cells": cells}))
    s = study.summarise(tmp_path)
    assert s["rows"]["badit-nobad"]["angles"][1] == [{"phase": 0, "step": 4, "intra": 76.0, "inter": 91.0},
                                                     {"phase": 0, "step": 8, "intra": 72.0, "inter": 91.0}]
    assert "angles" not in s["rows"]["lora"]
    ablation = s["rows"]["badit-nobad"]["against_badit"]  # the paper's "w/o BAD" against the full method
    assert ablation["pairs"] == 4 and ablation["mean_difference"] == pytest.approx((-3.0 + 0.0) / 2)
    assert "against_badit" not in s["rows"]["lora"]
    assert "| badit-nobad | w/o BAD | 51.2 ± 0.4 | -1.50 (0.500, 2 seeds) |" in study.markdown("t", s)
    assert s["continual_matrices"]["badit-nobad (order 1, seed 0)"]["rougeL"] == json.loads(
        (tmp_path / "cells" / "badit-nobad-continual-o1-s0" / "continual.json").read_text())["rougeL"]
    pytest.importorskip("matplotlib")
    study.plots(s, tmp_path)
    for name in ("scores", "figure4", "continual", "continual_average"):
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
