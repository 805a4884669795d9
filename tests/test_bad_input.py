"""Bad checkpoints give errors that name the file, the field or tensor, and the fix."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import load_model, load_tokenizer


@pytest.fixture
def ckpt(tiny_checkpoints, tmp_path):
    shutil.copytree(tiny_checkpoints["qwen3"], tmp_path / "ckpt")
    return tmp_path / "ckpt"


def edit_config(ckpt, **changes):
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, **changes}))


def edit_weights(ckpt, edit):
    weights = load_file(ckpt / "model.safetensors")
    edit(weights)
    save_file(weights, ckpt / "model.safetensors")


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*prepare_smollm2"):
        load_model(tmp_path / "nowhere")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_model(ckpt)


def test_corrupt_config(ckpt):
    (ckpt / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load_model(ckpt)


def test_config_missing_field(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["hidden_size"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json: field 'hidden_size' is missing"):
        load_model(ckpt)


def test_unsupported_model_type(ckpt):
    edit_config(ckpt, model_type="gpt2")
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported.*llama, mistral, qwen2, qwen3, gemma2"):
        load_model(ckpt)


def test_unsupported_rope_type(ckpt):
    edit_config(ckpt, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0})
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        load_model(ckpt)


def test_wrong_shape(ckpt):
    key = "model.layers.1.mlp.gate_proj.weight"
    edit_weights(ckpt, lambda w: w.update({key: torch.zeros(7, 64)}))
    with pytest.raises(ValueError, match=rf"model.safetensors: tensor '{key}' has shape \(7, 64\).*\(96, 64\)"):
        load_model(ckpt)


def test_missing_tensor(ckpt):
    edit_weights(ckpt, lambda w: w.pop("model.layers.2.self_attn.q_norm.weight"))
    with pytest.raises(ValueError, match="lacks tensors layers.2.self_attn.q_norm.weight"):
        load_model(ckpt)


def test_unexpected_tensor(ckpt):
    edit_weights(ckpt, lambda w: w.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.mlp.extra.weight'"):
        load_model(ckpt)


def test_missing_tokenizer(ckpt):
    with pytest.raises(FileNotFoundError, match="tokenizer.json is missing"):
        load_tokenizer(ckpt)


# ---------------------------------------------------------------------------------------------- the command lines
# Every bad input of a class gives exit status 2 and one paragraph naming the flag, file or field, with no
# traceback, before any work starts.

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import eval as evaluation  # noqa: E402
import train  # noqa: E402
from conftest import ROOT  # noqa: E402
from checks import command  # noqa: E402

FAST = ["--data", "classroom", "--tasks", "sort_ascending,sort_descending", "--limit", "8", "--batch-size", "4",
        "--epochs", "2", "--eval", "none", "--device", "cpu", "--dtype", "float32"]


# --device cuda:99 is refused everywhere: for want of CUDA, or of a 100th GPU
NO_SUCH_GPU = "CUDA device(s)" if torch.cuda.is_available() else "no CUDA device is available"


def refused(capsys, main, argv) -> str:
    """Run a command line in-process as its __main__ would; -> its stderr, after checking it failed cleanly."""
    with pytest.raises(SystemExit) as stop:
        command(lambda: main(argv))
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("flags, message", [
    (["--limit", "0"], "argument --limit: 0 must be >= 1"),
    (["--limit", "-3"], "argument --limit: -3 must be >= 1"),
    (["--eval-limit", "0"], "argument --eval-limit: 0 must be >= 1"),
    (["--epochs", "0"], "argument --epochs: 0 must be >= 1"),
    (["--batch-size", "0"], "argument --batch-size"),
    (["--grad-accum", "0"], "argument --grad-accum"),
    (["--rank", "0"], "argument --rank"),
    (["--num-experts", "-1"], "argument --num-experts"),
    (["--lr=-1e-3"], "argument --lr: -1e-3 must be > 0"),
    (["--lr", "nan"], "argument --lr: nan must be > 0"),
    (["--lr", "inf"], "argument --lr: inf must be > 0"),
    (["--lr", "fast"], "argument --lr: 'fast' is not a number"),
    (["--top-k", "0"], "argument --top-k"),
    (["--max-len", "0"], "argument --max-len: 0 must be >= 16"),
    (["--max-len", "40"], "--max-len 40 must exceed --max-answer-len 50"),
    (["--tasks", ""], "argument --tasks: '' has an empty name"),
    (["--tasks", ","], "argument --tasks: ',' has an empty name"),
    (["--tasks", "copy_words,copy_words"], "names something twice"),
    (["--dropout", "1"], "argument --dropout: 1 must be >= 0 and < 1"),
    (["--warmup", "1.5"], "argument --warmup"),
    (["--alpha", "0"], "argument --alpha"),
    (["--seed", "-1"], "argument --seed"),
    (["--method", "badit", "--top-k", "2"], "--top-k is for loramoe only"),
    (["--method", "loramoe", "--top-k", "7"], "--top-k 7 must be at most --num-experts"),
    (["--method", "bdit"], "argument --method: invalid choice"),
    (["--tasks", "nope"], "classroom suite has no task 'nope'"),
    (["--data", "/nowhere"], "data root /nowhere does not exist"),
    (["--device", "cuda:99"], NO_SUCH_GPU),
    (["--device", "tpu9"], "--device 'tpu9' is not a device"),
    (["--model", "/nowhere/model"], "model folder /nowhere/model does not exist"),
    (["--batch-size", "6", "--grad-accum", "4"], "--batch-size 6 must be a multiple of world size x --grad-accum"),
])
def test_train_flags(tiny_trainable, tmp_path, capsys, flags, message):
    argv = ["--model", str(tiny_trainable), "--out", str(tmp_path / "run"), *FAST, *flags]
    assert message in refused(capsys, train.main, argv)
    assert not (tmp_path / "run" / "config.json").exists()  # refused before any work


@pytest.mark.parametrize("instance, message", [
    ({"input": 7, "output": ["y"]}, r"train.json: Instances\[0\].input must be a string, not int"),
    ({"input": ["x"], "output": ["y"]}, r"train.json: Instances\[0\].input must be a string, not list"),
    ({"input": "x", "output": [3]}, r"Instances\[0\].output must be a non-empty list of strings"),
    ("not an object", r"Instances\[0\] must be an object"),
])
def test_bad_data_is_found_before_the_model_is_loaded(tiny_trainable, tmp_path, capsys, instance, message):
    import re

    data = tmp_path / "data" / "t"
    data.mkdir(parents=True)
    for split in ("train", "dev", "test"):
        (data / f"{split}.json").write_text(json.dumps({"Definition": ["Do it."], "Instances": [instance]}))
    broken = tmp_path / "model"  # a model whose weights would fail to load: the data error must come first
    shutil.copytree(tiny_trainable, broken)
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:100])
    argv = ["--model", str(broken), "--out", str(tmp_path / "run"), *FAST, "--data", str(tmp_path / "data"), "--tasks", "t"]
    assert re.search(message, refused(capsys, train.main, argv))


def test_non_utf8_data(tmp_path):
    from data import read_task

    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "train.json").write_bytes('{"Definition": ["caf\xe9"], "Instances": []}'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"t/train.json: not UTF-8 text \(byte 0xe9 at offset 20\); save the file as UTF-8"):
        read_task(tmp_path, "t", "train")


def test_a_tokenizer_larger_than_the_vocabulary(tiny_trainable, tmp_path):
    shutil.copytree(tiny_trainable, tmp_path / "m")
    edit_config(tmp_path / "m", vocab_size=100)
    with pytest.raises(ValueError, match=r"tokenizer.json has 257 tokens, more than the vocab_size 100 of .*config.json"):
        load_tokenizer(tmp_path / "m")


def test_a_truncated_model_file(ckpt):
    (ckpt / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"model.safetensors: cannot be read as safetensors .* incomplete or damaged; re-download"):
        load_model(ckpt)


@pytest.mark.parametrize("damaged", ["trainer.safetensors", "trainer.json", "adapter.safetensors"])
def test_a_damaged_checkpoint_is_named_on_resume(tiny_trainable, tmp_path, capsys, damaged):
    out = tmp_path / "run"
    train.main(["--model", str(tiny_trainable), "--out", str(out), *FAST])
    file = out / "checkpoint" / damaged
    file.write_bytes(file.read_bytes()[:len(file.read_bytes()) // 2])
    err = refused(capsys, train.main, ["--out", str(out), "--resume"])
    assert str(file) in err and ("damaged" in err or "not written completely" in err)


def test_run_directories_are_never_silently_reused(tiny_trainable, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--model", str(tiny_trainable), "--out", str(out), *FAST]
    train.main(argv)
    assert "already holds a run" in refused(capsys, train.main, argv)
    train.main(argv + ["--overwrite"])  # an explicit replacement
    assert "--resume continues the saved configuration" in refused(capsys, train.main, ["--out", str(out), "--resume", "--lr", "1"])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert "is not empty and holds no run" in refused(capsys, train.main, argv[:3] + [str(tmp_path / "other")] + FAST)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    assert "config.json is missing" in refused(capsys, train.main, ["--out", str(tmp_path / "empty"), "--resume"])


def test_eval_and_model_command_lines(tiny_trainable, tmp_path, capsys):
    import model as model_cli

    assert "config.json is missing" in refused(capsys, evaluation.main, ["evaluate", str(tmp_path)])
    assert "argument --limit" in refused(capsys, evaluation.main, ["evaluate", str(tmp_path), "--limit", "0"])
    (tmp_path / "config.json").write_text(json.dumps({"method": "lora", "setting": "continual", "tasks": ["a", "b", "c"]}))
    (tmp_path / "continual.json").write_text(json.dumps({"order": ["a", "b", "c"], "rougeL": [[50, 10, 20]]}))
    assert "full T x T score matrix; this one has 1 row(s) of 3 task(s)" in refused(capsys, evaluation.main, ["continual", str(tmp_path)])
    assert NO_SUCH_GPU in refused(capsys, model_cli.main, ["--model", str(tiny_trainable), "--device", "cuda:99"])
    assert "argument --max-new-tokens: 0 must be >= 1" in refused(capsys, model_cli.main, ["--max-new-tokens", "0"])


def run_cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


def test_errors_print_one_paragraph_without_a_traceback(tiny_trainable, tmp_path):
    for cmd in (["train.py", "--model", tiny_trainable, "--out", tmp_path / "r", *FAST, "--tasks", "nope"],
                ["eval.py", "evaluate", tmp_path / "nowhere"],
                ["data.py", "--show", tmp_path / "nowhere"],
                ["model.py", "--model", tmp_path / "nowhere"]):
        result = run_cli(*cmd)
        assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr, result.stderr


def test_a_second_process_on_a_run_directory_is_refused(tiny_trainable, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, ROOT / "train.py", "--model", tiny_trainable, "--out", out,
                              *FAST[:-6], "--epochs", "1000", "--eval", "none", "--device", "cpu"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((out / "log.jsonl").is_file() and (out / "log.jsonl").read_text()):
            time.sleep(0.2)
        second = run_cli("train.py", "--out", out, "--resume")
        assert second.returncode == 2 and "is in use by another train.py (pid" in second.stderr, second.stderr
    finally:
        first.send_signal(__import__("signal").SIGINT)
        first.wait(timeout=60)


def test_a_copied_run_resumes_in_its_own_folder(tiny_trainable, tmp_path):
    argv = ["--model", tiny_trainable, "--out", tmp_path / "source", *FAST, "--epochs", "3", "--method", "lora"]
    stopped = run_cli("tests/faults.py", "interrupt@3", *argv)
    assert stopped.returncode == 130, stopped.stderr
    shutil.copytree(tmp_path / "source", tmp_path / "copy")
    before = {p.relative_to(tmp_path / "source"): p.read_bytes() for p in (tmp_path / "source").rglob("*") if p.is_file()}
    resumed = run_cli("train.py", "--out", tmp_path / "copy", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    after = {p.relative_to(tmp_path / "source"): p.read_bytes() for p in (tmp_path / "source").rglob("*") if p.is_file()}
    assert after == before  # the source run is untouched
    assert (tmp_path / "copy" / "adapter.safetensors").is_file()
    assert json.loads((tmp_path / "copy" / "config.json").read_text())["out"] == str(tmp_path / "source")  # as saved


def test_a_failed_checkpoint_write_keeps_the_previous_one(tiny_trainable, tmp_path):
    argv = ["--model", tiny_trainable, *FAST, "--epochs", "3", "--method", "badit"]
    full = run_cli("train.py", "--out", tmp_path / "full", *argv)
    assert full.returncode == 0, full.stderr
    failed = run_cli("tests/faults.py", "diskfull@2", "--out", tmp_path / "run", *argv)  # the epoch 2 checkpoint
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert "could not write the checkpoint ([Errno 28] No space left on device" in failed.stderr
    assert "the previous checkpoint in" in failed.stderr and "is intact" in failed.stderr
    assert json.loads((tmp_path / "run" / "checkpoint" / "trainer.json").read_text())["epoch"] == 1
    assert not (tmp_path / "run" / "checkpoint.new").exists()
    resumed = run_cli("train.py", "--out", tmp_path / "run", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    read = lambda out: [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]  # noqa: E731
    losses = lambda out: [(e["step"], e["loss"]) for e in read(out) if "loss" in e]  # noqa: E731
    assert losses(tmp_path / "run") == losses(tmp_path / "full")


def test_hub_ids_resolve_through_the_cache_offline(tiny_trainable, tmp_path):
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_trainable, snapshot)
    (tmp_path / "hub" / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text("0123abcd")
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    ok = run_cli("model.py", "--model", "org/tiny", "--prompt", "abc", "--max-new-tokens", "2", env=env)
    assert ok.returncode == 0, ok.stderr
    missing = run_cli("model.py", "--model", "org/missing", env=env)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert f"org/missing is not a local folder and is not in the Hugging Face cache {tmp_path / 'hub'}" in missing.stderr
    assert "HF_HUB_OFFLINE is set" in missing.stderr
