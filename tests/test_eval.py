"""Metrics: ROUGE-L equals rouge-score's, SuperNI exact match, colla, the continual metrics on a
hand-made matrix, and the analyses' building blocks."""

import random

import pytest
import torch
from rouge_score import rouge_scorer

from conftest import superni_slice
from data import load_tasks
from eval import coactivation_histogram, colla, conflict_matrix, continual_metrics, exact_match, score


def test_rouge_l_equals_rouge_score_on_superni_references():
    rng = random.Random(0)
    predictions = []
    for task in load_tasks(superni_slice(), split="train"):  # 34 real instances of three tasks, 16 with several references
        for inst in task.instances:
            words = rng.choice(inst["output"]).split()
            pred = " ".join(w for w in words if rng.random() < 0.7) + rng.choice(["", " extra words", " running"])
            predictions.append({"task": task.name, "prediction": pred, "references": inst["output"]})
    ours = score(predictions)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = {}
    for p in predictions:
        best = max(scorer.score(ref, p["prediction"])["rougeL"].fmeasure for ref in p["references"])
        expected.setdefault(p["task"], []).append(100 * best)
    for task, values in expected.items():
        assert ours["per_task"][task]["rougeL"] == pytest.approx(sum(values) / len(values), abs=1e-9)
        assert ours["per_task"][task]["n"] == {"task002_quoref_answer_generation": 6, "task591_sciq_answer_generation": 8,
                                               "task748_glucose_reverse_cause_event_detection": 20}[task]
    assert ours["rougeL"] == pytest.approx(sum(sum(v) / len(v) for v in expected.values()) / 3, abs=1e-9)
    assert 10 < ours["rougeL"] < 95  # the perturbations give partial credit


def test_exact_match_superni_normalisation():
    assert exact_match("The Answer.", ["the answer"]) == 100.0
    assert exact_match("  an   answer ", ["x", "An answer!"]) == 100.0
    assert exact_match("answers", ["answer"]) == 0.0
    predictions = [{"task": "t", "prediction": p, "references": ["yes"]} for p in ("Yes.", "no", "yes", "YES!")]
    assert score(predictions)["per_task"]["t"]["exact_match"] == 75.0


def test_continual_metrics_on_a_hand_made_matrix():
    a = [[50, 10, 20],
         [30, 60, 25],
         [40, 45, 70]]
    m = continual_metrics(a, single=[55, 65, 60])
    assert m["AP"] == pytest.approx((40 + 45 + 70) / 3)
    # Fgt: task 1 peaked at 50 (after task 1), ends at 40; task 2 peaked at 60, ends at 45
    assert m["Fgt"] == pytest.approx(((50 - 40) + (60 - 45)) / 2)
    assert m["Bwt"] == pytest.approx(((40 - 50) + (45 - 60)) / 2)
    assert m["Fwt"] == pytest.approx((50 + 60 + 70) / 3 - (55 + 65 + 60) / 3)
    # forgetting only counts scores after the task was learned (METHOD.md section 9, item 9): the 10 before it is ignored
    assert continual_metrics([[5, 90], [20, 30]])["Fgt"] == pytest.approx(5 - 20)


def test_colla():
    assert colla(40.0, {"a": 50.0, "b": 40.0}) == pytest.approx(-5.0)


def test_conflict_matrix_and_coactivation():
    g = {"a": [torch.tensor([1.0, 0.0])], "b": [torch.tensor([-1.0, 0.0])], "c": [torch.tensor([0.0, 2.0])]}
    tasks, C, mean_off, negative = conflict_matrix(g)
    assert torch.allclose(C, torch.tensor([[1.0, -1, 0], [-1, 1, 0], [0, 0, 1]]))
    assert mean_off == pytest.approx(-1 / 3) and negative == pytest.approx(1 / 3)
    w = torch.zeros(64, 64)  # four 32x32 blocks; ten percent of 4 -> the top block only
    ga, gb = w.clone(), w.clone()
    ga[:32, :32] = 1
    gb[:32, :32] = 1
    gc = w.clone()
    gc[32:, 32:] = 1
    assert coactivation_histogram({"a": [ga], "b": [gb], "c": [gc]}) == [2, 1, 1, 0]


def test_coactivation_marks_the_top_blocks_of_every_matrix():
    """METHOD.md section 8: the top 10 % blocks per weight matrix, so that a layer with 100x larger gradients
    does not take every mark (marking over all layers at once, it would)."""
    g = torch.Generator().manual_seed(0)
    small, large = torch.rand(320, 320, generator=g), 100 * torch.rand(320, 320, generator=g)  # 100 blocks each
    counts = coactivation_histogram({"a": [small, large]})
    assert counts == [200 - 20, 20]  # 10 blocks in each matrix
    one = torch.zeros(320, 320)
    one[:32, :32] = 1  # task b's gradient sits in one block of the small matrix only
    counts = coactivation_histogram({"a": [small, large], "b": [one, large]})
    assert sum(counts[1:]) >= 11 and counts[2] >= 10  # both tasks mark the large matrix's top blocks


def test_continual_metrics_refuse_a_partial_matrix():
    with pytest.raises(ValueError, match="full T x T score matrix; this one has 1 row"):
        continual_metrics([[50, 10, 20]])
