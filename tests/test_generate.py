"""A trained adapter answers prompts: eval.py generate for every method (greedy equals evaluate's own
predictions, sampling is seeded), and eval.py export (a merged checkpoint that transformers loads to the
same logits, PEFT's format), with the refusals of what cannot be merged."""

import json
import subprocess
import sys

import pytest
import torch

import eval as evaluation
import train
from checks import command
from conftest import ROOT, hf_model
from data import collate

FAST = ["--data", "classroom", "--tasks", "sort_ascending,sort_descending", "--limit", "8", "--batch-size", "4",
        "--epochs", "2", "--lr", "1e-2", "--eval", "after", "--eval-limit", "2", "--max-new-tokens", "4", "--device",
        "cpu", "--dtype", "float32"]


@pytest.fixture(scope="module")
def runs(tiny_trainable, tmp_path_factory):
    """method -> a trained run directory (one per method, and a single-task cgc run)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for method in train.METHODS + ("elrea",):
        extra = ["--clusters", "2", "--proj-dim", "64", "--feature-epochs", "1"] if method == "elrea" else []
        train.main(["--model", str(tiny_trainable), "--out", str(root / method), *FAST, "--method", method, *extra])
        out[method] = root / method
    train.main(["--model", str(tiny_trainable), "--out", str(root / "cgc-single"), *FAST, "--method", "cgc",
                "--setting", "single"])
    out["cgc-single"] = root / "cgc-single"
    return out


def generated(capsys, argv) -> list[str]:
    evaluation.main(["generate", *map(str, argv)])
    return capsys.readouterr().out.splitlines()


def refused(capsys, argv) -> str:
    with pytest.raises(SystemExit) as stop:
        command(lambda: evaluation.main(list(map(str, argv))))
    assert stop.value.code == 2
    return capsys.readouterr().err


def test_greedy_generation_equals_the_runs_own_predictions_for_every_method(runs, capsys):
    for method, run in runs.items():
        if method == "cgc-single":
            continue
        predictions = [json.loads(line) for line in (run / "metrics_test_predictions.jsonl").read_text().splitlines()]
        first = next(p for p in predictions if p["task"] == "sort_descending")
        inputs = first["prompt"].split("Input: ")[1].removesuffix("\nOutput: ")
        task = ["--task", "sort_descending"]
        out = generated(capsys, [run, "--prompt", inputs, *task, "--max-new-tokens", "4"])
        assert out[-1] == first["prediction"], method  # the same prompt, adapter and decoding as evaluate's
        verbatim = generated(capsys, [run, "--prompt", first["prompt"], "--max-new-tokens", "4",
                                      *(task if method == "cgc" else [])])
        assert verbatim[-1] == first["prediction"], method  # without --task the text is the whole prompt


def test_cgc_needs_its_task_and_a_single_task_folder_answers(runs, capsys):
    err = refused(capsys, ["generate", runs["cgc"], "--prompt", "3 1 2"])
    assert "cgc's gate depends on the task: give --task, one of sort_ascending, sort_descending" in err
    assert "is not one of this run's tasks" in refused(capsys, ["generate", runs["cgc"], "--prompt", "1", "--task", "nope"])
    folder = runs["cgc-single"] / "sort_descending"
    predictions = [json.loads(line) for line in (folder / "metrics_test_predictions.jsonl").read_text().splitlines()]
    inputs = predictions[0]["prompt"].split("Input: ")[1].removesuffix("\nOutput: ")
    out = generated(capsys, [folder, "--prompt", inputs, "--task", "sort_descending", "--max-new-tokens", "4"])
    assert out[-1] == predictions[0]["prediction"]  # with task id 1, as it was trained


def test_prompts_from_stdin_and_a_jsonl_file_and_elreas_weights(runs, tmp_path):
    stdin = subprocess.run([sys.executable, "eval.py", "generate", runs["lora"], "--max-new-tokens", "3"], cwd=ROOT,
                           input="3 1 2\n\n9 8\n", capture_output=True, text=True, timeout=300)
    assert stdin.returncode == 0 and len(stdin.stdout.splitlines()) == 2, stdin.stderr
    file = tmp_path / "prompts.jsonl"
    file.write_text('{"input": "3 1 2"}\n{"prompt": "hello"}\n')
    result = subprocess.run([sys.executable, "eval.py", "generate", runs["elrea"], "--file", file, "--task",
                             "sort_ascending", "--verbose", "--max-new-tokens", "3"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    weights = [line for line in result.stdout.splitlines() if line.startswith("elrea weights: ")]
    assert len(weights) == 2 and all("base " in w and "c0 " in w for w in weights)
    (tmp_path / "bad.jsonl").write_text('{"text": 1}\n')
    bad = subprocess.run([sys.executable, "eval.py", "generate", runs["lora"], "--file", tmp_path / "bad.jsonl"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and 'line 1 needs a string field "prompt"' in bad.stderr


def test_sampling_is_seeded(runs, capsys):
    argv = [runs["badit"], "--prompt", "3 1 2", "--task", "sort_ascending", "--temperature", "2", "--max-new-tokens", "8"]
    first, again = generated(capsys, [*argv, "--seed", "1"]), generated(capsys, [*argv, "--seed", "1"])
    others = [generated(capsys, [*argv, "--seed", str(s)])[-1] for s in range(2, 6)]
    assert first == again and any(o != first[-1] for o in others)
    assert "argument --top-p" in refused(capsys, ["generate", runs["lora"], "--prompt", "x", "--top-p", "0"])


@pytest.mark.parametrize("method, task", [("lora", None), ("pissa", None), ("cgc", "sort_descending")])
def test_a_merged_export_loads_in_transformers_with_our_logits(runs, tmp_path, method, task):
    extra = ["--task", task] if task else []
    evaluation.main(["export", str(runs[method]), "--merged", str(tmp_path / "merged"), *extra, "--device", "cpu"])
    model, tok, _ = evaluation.load_run(runs[method], device="cpu", dtype="float32")
    cfg = evaluation.read_config(runs[method])
    examples = evaluation.test_examples(tok, "classroom", cfg["tasks"], limit=2, max_len=256)
    x = collate(examples, tok.pad_token_id)
    task_ids = torch.full((len(examples),), cfg["tasks"].index(task)) if task else None
    with torch.no_grad():
        ours = model(x["ids"], x["mask"], route_mask=x["route"], task_ids=task_ids)
        ref = hf_model(tmp_path / "merged")(input_ids=x["ids"], attention_mask=x["mask"]).logits
    real = x["mask"].bool()
    torch.testing.assert_close(ref[real], ours[real], atol=2e-4, rtol=0)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_what_cannot_be_exported_is_refused_with_what_works_instead(runs, tmp_path, capsys):
    for method in ("loramoe", "badit", "badit-noregroup", "elrea", "gainlora"):
        err = refused(capsys, ["export", runs[method], "--merged", tmp_path / method])
        assert f"a {method} adapter cannot be exported as one static weight" in err and "eval.py generate" in err
        assert not (tmp_path / method).exists()
    assert "--peft covers lora, pissa and o-lora" in refused(capsys, ["export", runs["cgc"], "--peft", tmp_path / "p"])
    assert "give --task, one of sort_ascending" in refused(capsys, ["export", runs["cgc"], "--merged", tmp_path / "m"])
    evaluation.main(["export", str(runs["lora"]), "--peft", str(tmp_path / "peft")])
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 32
