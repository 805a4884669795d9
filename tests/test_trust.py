"""Nothing lost, whatever the path, the disk or the file (files.py's rule); every failure of the operating system and
every record of the wrong shape one clear error; a run that is not the same run refused; a run that has gone wrong
stopped. Where the point is that nothing changed, the files are compared byte for byte."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import eval as evaluation
import files
import runs
import study
import train
from checks import command
from conftest import ROOT, cut_and_resume

FAST = ["--data", "classroom", "--tasks", "sort_ascending,sort_descending", "--limit", "8", "--batch-size", "4",
        "--epochs", "2", "--eval", "none", "--device", "cpu", "--dtype", "float32"]
EVAL = ["--limit", "1", "--max-new-tokens", "2", "--device", "cpu", "--dtype", "float32"]


def tree(folder) -> dict:
    """Every file under folder (or the file itself) -> its bytes; links by their target."""
    folder = Path(folder)
    if folder.is_file():
        return {".": folder.read_bytes()}
    return {p.relative_to(folder): (os.readlink(p) if p.is_symlink() else p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file() or p.is_symlink()}


def refused(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as stop:
        command(lambda: main([str(a) for a in argv]))
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    assert "Traceback" not in err
    return err


def run_cli(*args, timeout=300, **kw):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kw)


@pytest.fixture(scope="module")
def trained(tiny_trainable, tmp_path_factory):
    """Finished tiny runs (lora, and lora with another seed), copied by each test that changes them."""
    root = tmp_path_factory.mktemp("trained")
    for name, extra in (("a", []), ("b", ["--seed", "1"])):
        train.main(["--model", str(tiny_trainable), "--out", str(root / name), *FAST, "--method", "lora", *extra])
    return root


def copy_run(trained, name, dest):
    shutil.copytree(trained / name, dest)
    return dest


# ----------------------------------------------------------------------------------------------
# 1. Which paths are the user's


def superni_like(folder, task="t1"):
    (folder / task).mkdir(parents=True)
    record = {"Definition": ["Copy the input."], "Positive Examples": [], "Negative Examples": [],
              "Instances": [{"id": str(i), "input": "ab", "output": ["ab"]} for i in range(4)]}
    for split in ("train", "test"):
        (folder / task / f"{split}.json").write_text(json.dumps(record))
    return folder


def test_outputs_and_inputs_of_a_command_lie_apart(tiny_trainable, trained, tmp_path, capsys):
    run = copy_run(trained, "a", tmp_path / "run")
    data = superni_like(run / "mydata")  # the user's data, inside a run folder
    small = ["--limit", "4", "--batch-size", "4", "--epochs", "1", "--eval", "none", "--device", "cpu", "--max-len", "256"]
    before = tree(run)
    err = refused(capsys, train.main, ["--model", tiny_trainable, "--out", run, "--data", data, *small, "--overwrite"])
    assert f"holds --data {data}" in err and tree(run) == before
    err = refused(capsys, train.main, ["--model", tiny_trainable, "--out", data / "run", "--data", data, *small])
    assert "lies inside --data" in err and not (data / "run").exists()
    model = tmp_path / "model"
    shutil.copytree(tiny_trainable, model)
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "model": str(model)}))
    before = tree(model)
    assert "is the run's --model" in refused(capsys, evaluation.main, ["export", run, "--merged", model])
    assert "lies inside RUN_DIR" in refused(capsys, evaluation.main, ["export", run, "--peft", run / "peft"])
    assert "overlap" in refused(capsys, evaluation.main, ["export", run, "--peft", tmp_path / "x", "--merged", tmp_path / "x"])
    assert tree(model) == before and not (tmp_path / "x").exists() and not (run / "peft").exists()


def test_a_run_s_own_folder_keeps_what_train_py_did_not_write(tiny_trainable, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = ["--model", tiny_trainable, "--out", out, *FAST]
    monkeypatch.setattr(train, "train_and_evaluate", lambda *a: (_ for _ in ()).throw(RuntimeError("stop")))
    with pytest.raises(RuntimeError):  # a run that failed after claiming its folder, before its first step
        train.main([str(a) for a in argv])
    monkeypatch.undo()
    assert files.kind_of(out) == "run"
    (out / "metrics_before.json").write_text("{}")  # what a restart would delete: the base model's evaluation
    before = tree(out)
    assert "never finished a step, with files a restart would delete (metrics_before.json)" in refused(capsys, train.main, argv)
    (out / "metrics_before.json").unlink()
    (out / "notes.txt").write_text("the user's")
    before = tree(out)
    assert "holds files that train.py did not write (notes.txt)" in refused(capsys, train.main, argv + ["--overwrite"])
    assert tree(out) == before


def test_an_export_replaces_only_the_same_run_s_export(trained, tmp_path, capsys):
    a, b, exp = trained / "a", trained / "b", tmp_path / "exp"
    evaluation.main(["export", str(a), "--peft", str(exp)])
    evaluation.main(["export", str(a), "--peft", str(exp)])  # the same run's: written again
    before = tree(exp)
    assert "holds the peft export of another run" in refused(capsys, evaluation.main, ["export", b, "--peft", exp])
    assert "already holds files that eval.py export did not write (a peft export)" in refused(
        capsys, evaluation.main, ["export", a, "--merged", exp])
    assert tree(exp) == before


def test_an_evaluation_folder_belongs_to_one_run(trained, tmp_path, capsys):
    ev = tmp_path / "ev"
    evaluation.main(["evaluate", str(trained / "a"), "--out", str(ev), *EVAL])
    before = tree(ev)
    assert "holds the evaluation of another run" in refused(capsys, evaluation.main, ["evaluate", trained / "b", "--out", ev, *EVAL])
    assert tree(ev) == before


def test_compare_replaces_only_a_file_it_wrote_unchanged(trained, tmp_path, capsys):
    for run in ("a", "b"):
        (trained / run / "metrics_test.json").exists() or evaluation.main(["evaluate", str(trained / run), "--replace", *EVAL])
    mine = tmp_path / "mine.md"
    mine.write_text("| task | my own notes\n")
    assert "is not a file that eval.py compare wrote" in refused(capsys, evaluation.main, ["compare", trained / "a", "--out", mine])
    assert mine.read_text() == "| task | my own notes\n"
    ours = tmp_path / "ours.md"
    evaluation.main(["compare", str(trained / "a"), "--out", str(ours)])
    evaluation.main(["compare", str(trained / "a"), str(trained / "b"), "--out", str(ours)])  # its own: replaced
    assert "b (lora)" in ours.read_text()
    ours.write_text(ours.read_text().replace("| task", "| Task"))  # edited by hand: the user's now
    before = ours.read_text()
    assert "or it was edited since" in refused(capsys, evaluation.main, ["compare", trained / "a", "--out", ours])
    assert ours.read_text() == before


def test_a_failed_command_leaves_no_marker_and_marks_no_folder_it_did_not_make(trained, tmp_path):
    new, users = tmp_path / "new", tmp_path / "users"
    users.mkdir()
    for out in (new, users):
        result = run_cli("eval.py", "export", trained / "a", "--peft", out, "--device", "cuda:99")
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert not new.exists()  # made, then removed: it stayed empty
    assert not (users / files.MARKER).exists()  # the user's folder never gets the project's marker
    (users / "adapter_config.json").write_text("the user's")
    result = run_cli("eval.py", "export", trained / "a", "--peft", users)
    assert result.returncode == 2 and "has no .badit.json marker" in result.stderr, result.stderr
    assert (users / "adapter_config.json").read_text() == "the user's"


def test_a_symbolic_link_in_an_output_folder_is_refused(tiny_trainable, trained, tmp_path, capsys):
    run = copy_run(trained, "a", tmp_path / "run")
    (tmp_path / "user.txt").write_text("the user's\n")
    (run / "log.jsonl").unlink()
    (run / "log.jsonl").symlink_to(tmp_path / "user.txt")
    for argv in (["--out", run, "--resume"], ["--model", tiny_trainable, "--out", run, *FAST, "--method", "lora", "--overwrite"]):
        assert "holds a symbolic link" in refused(capsys, train.main, argv)
    assert (tmp_path / "user.txt").read_text() == "the user's\n"


def test_study_names_cells_and_older_folders(tiny_trainable, tmp_path, capsys):
    grid = ["--methods", "lora", "--seeds", "0", "--dir", tmp_path / "d", "--", "--model", tiny_trainable, *FAST[:-6]]
    assert "a name, not a path" in refused(capsys, study.main, ["../escape", *grid])
    for flag in ("--out", "--seed", "--method"):
        err = refused(capsys, study.main, ["s", *grid, flag, "x" if flag != "--seed" else "3"])
        assert f"{flag} after -- would override what the grid sets" in err
    old = tmp_path / "d" / "results" / "s"
    (old / "cells").mkdir(parents=True)
    (old / "study.json").write_text("{}")  # a folder without the marker: the user's, even if it looks like a study
    before = tree(old)
    assert "did not mark as a study's" in refused(capsys, study.main, ["s", "--overwrite", *grid])
    assert tree(old) == before


# ----------------------------------------------------------------------------------------------
# 2. Failures of the operating system, and records of the wrong shape


@pytest.mark.parametrize("error, message, code", [
    (OSError(errno.ENOSPC, "No space left on device", "/x/run/log.jsonl"),
     "error: /x/run/log.jsonl: No space left on device (ENOSPC); free disk space", 2),
    (PermissionError(errno.EACCES, "Permission denied", "/x/out"), "error: /x/out: Permission denied (EACCES); you lack", 2),
    (OSError(errno.EROFS, "Read-only file system", "/x"), "the file system is read-only", 2),
    (KeyboardInterrupt(), "interrupted.", 130),
])
def test_an_error_of_the_system_is_one_paragraph(capsys, error, message, code):
    def main():
        raise error
    with pytest.raises(SystemExit) as stop:
        command(main)
    err = capsys.readouterr().err
    assert stop.value.code == code and message in err and "Traceback" not in err


def test_a_closed_pipe_ends_quietly(tiny_trainable, tmp_path):
    cmd = f"{sys.executable} train.py --model {tiny_trainable} --out {tmp_path / 'run'} {' '.join(FAST)} | head -1"
    result = subprocess.run(cmd, shell=True, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr


def test_a_half_deleted_old_checkpoint_never_blocks_resume(tiny_trainable, tmp_path, monkeypatch):
    argv = ["--model", tiny_trainable, *FAST, "--epochs", "3", "--method", "lora"]
    train.main([str(a) for a in argv] + ["--out", str(tmp_path / "full")])

    def stale_old():  # a SIGKILL while checkpoint.old was being deleted: trainer.json there, adapter gone
        old = tmp_path / "cut" / "checkpoint.old"
        shutil.copytree(tmp_path / "cut" / "checkpoint", old)
        (old / "adapter.safetensors").unlink()
        assert runs.checkpoint_folder(tmp_path / "cut" / "nowhere") is None
        assert not runs.complete(old)

    cut_and_resume(monkeypatch, argv, tmp_path / "cut", at_step=6, between=stale_old)  # epoch 2's checkpoint goes on
    losses = lambda out: [e["loss"] for e in files.read_jsonl(out / "log.jsonl") if "loss" in e]  # noqa: E731
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    assert not (tmp_path / "cut" / "checkpoint.old").exists()


def damage(run, what):
    if what == "log line 42":
        with open(run / "log.jsonl", "a") as f:
            f.write("42\n{}\n")
    elif what == "log line {}":
        text = (run / "log.jsonl").read_text()
        (run / "log.jsonl").write_text("{}\n" + text)
    elif what == "trainer.json {}":
        (run / "checkpoint" / "trainer.json").write_text("{}")
    elif what == "config without lr":
        cfg = json.loads((run / "config.json").read_text())
        del cfg["lr"]
        (run / "config.json").write_text(json.dumps(cfg))
    elif what == "config tasks a string":
        cfg = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps({**cfg, "tasks": "sort_ascending"}))
    (run / "adapter.safetensors").unlink()  # so that --resume has work to do


@pytest.mark.parametrize("what, message", [
    ("log line 42", "is '42', not a record"),
    ("log line {}", "log.jsonl: the field 'line 1: phase' is missing"),
    ("trainer.json {}", "trainer.json: the field 'phase' is missing"),
    ("config without lr", "config.json lacks the field(s) lr"),
    ("config tasks a string", "config.json: the field 'tasks' is \"sort_ascending\", not a list of strings"),
])
def test_a_record_of_the_wrong_shape_is_named_on_resume(trained, tmp_path, capsys, what, message):
    run = copy_run(trained, "a", tmp_path / "run")
    damage(run, what)
    assert message in refused(capsys, train.main, ["--out", run, "--resume"])


def test_a_model_or_adapter_of_the_wrong_shape_is_named(tiny_trainable, trained, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_trainable, model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "hidden_size": "64"}))
    err = refused(capsys, train.main, ["--model", model, "--out", tmp_path / "r", *FAST])
    assert "config.json: the field 'hidden_size' is \"64\", not an integer" in err
    (model / "config.json").write_text(json.dumps(cfg))
    tok_cfg = (model / "tokenizer_config.json").read_text()
    (model / "tokenizer_config.json").write_text(json.dumps({"eos_token": 5}))
    err = refused(capsys, train.main, ["--model", model, "--out", tmp_path / "r", *FAST])
    assert "tokenizer_config.json: the field 'eos_token' is 5, not a string or an object {...} or null" in err
    (model / "tokenizer_config.json").write_text(tok_cfg)
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    assert "the field 'weight_map' is" in refused(capsys, train.main, ["--model", model, "--out", tmp_path / "r", *FAST])
    assert f"{tiny_trainable} is a model checkpoint, not a run directory" in refused(
        capsys, evaluation.main, ["evaluate", tiny_trainable, *EVAL])
    run = copy_run(trained, "a", tmp_path / "run")
    train.main(["--model", str(tiny_trainable), "--out", str(tmp_path / "r2"), *FAST, "--method", "lora", "--lora-rank", "2"])
    shutil.copy(tmp_path / "r2" / "adapter.safetensors", run / "adapter.safetensors")  # rank 2 beside a rank-32 config
    assert "does not fit adapter_config.json beside it" in refused(capsys, evaluation.main, ["evaluate", run, *EVAL])


def test_prompts_that_are_not_utf8_or_a_silent_terminal(trained, tmp_path, capsys, monkeypatch):
    (tmp_path / "in.bin").write_bytes(b"fine\n\xff\xfe\n")
    with open(tmp_path / "in.bin", "rb") as stdin:
        result = run_cli("eval.py", "generate", trained / "a", "--max-new-tokens", "2", "--device", "cpu", stdin=stdin)
    assert result.returncode == 2 and "standard input is not UTF-8 text (byte 5" in result.stderr, result.stderr

    class Terminal:
        closed, buffer = False, type("B", (), {"read": lambda self: b"a prompt\n"})()

        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Terminal())
    prompts = evaluation.read_prompts(type("A", (), {"prompt": None, "file": None})())
    assert prompts == ["a prompt"] and "end with Ctrl-D" in capsys.readouterr().err


def test_a_hub_that_never_answers_is_named_in_time(tmp_path):
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []  # accepted and never answered
    threading.Thread(target=lambda: [held.append(server.accept()) for _ in range(20)], daemon=True).start()
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{server.getsockname()[1]}", "HF_HUB_CACHE": str(tmp_path),
           "BADIT_HUB_TIMEOUT": "2", "HF_HUB_OFFLINE": "0"}
    start = time.time()
    result = run_cli("hf.py", "--model", "someorg/somemodel", "--prompt", "hi", env=env, timeout=120)
    assert result.returncode == 2 and "did not answer within 2.0 s" in result.stderr, result.stderr
    assert "looking up someorg/somemodel" in result.stderr and time.time() - start < 60


# ----------------------------------------------------------------------------------------------
# 3. Not the same run


def test_resume_refuses_a_changed_model(tiny_trainable, tmp_path, capsys):
    model, out = tmp_path / "model", tmp_path / "run"
    shutil.copytree(tiny_trainable, model)
    train.main(["--model", str(model), "--out", str(out), *FAST])
    (out / "adapter.safetensors").unlink()
    weights = load_file(model / "model.safetensors")
    first = next(iter(weights))
    weights[first] = weights[first] + 1e-3
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    err = refused(capsys, train.main, ["--out", out, "--resume"])
    assert f"the model {model} changed since {out} began (model.safetensors differ)" in err


def test_a_checkpoint_of_another_phase_is_refused(tiny_trainable, tmp_path, capsys):
    cont, out = tmp_path / "continual", tmp_path / "run"
    train.main(["--model", str(tiny_trainable), "--out", str(cont), *FAST, "--setting", "continual", "--epochs", "1"])
    train.main(["--model", str(tiny_trainable), "--out", str(out), *FAST])
    shutil.rmtree(out / "checkpoint")
    shutil.copytree(cont / "checkpoint", out / "checkpoint")  # task 2's checkpoint, in a joint run
    (out / "adapter.safetensors").unlink()
    assert "is the checkpoint of phase 2" in refused(capsys, train.main, ["--out", out, "--resume"])


def test_a_study_cell_is_finished_only_with_a_whole_record(tmp_path):
    cell, run = study.Cell("lora-s0", method="lora"), tmp_path / "lora-s0"
    run.mkdir()
    whole = {"rougeL": 1.0, "exact_match": 0.0, "per_task": {"t": {"rougeL": 1.0, "exact_match": 0.0, "n": 1}}}
    for text, finished in (('{"rougeL": 1', False), ("{}", False), (json.dumps(whole), True)):
        (run / "metrics_test.json").write_text(text)
        assert study.done(cell, run) is finished


def test_a_comparison_marks_rows_evaluated_otherwise(tmp_path, capsys):
    def fake(name, n, tokens):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"method": "lora", "setting": "mtl", "tasks": ["t"]}))
        (folder / "metrics_test.json").write_text(json.dumps({"rougeL": 1.0, "exact_match": 0.0, "max_new_tokens": tokens,
                                                              "per_task": {"t": {"rougeL": 1.0, "exact_match": 0.0, "n": n}}}))
        return str(folder)
    evaluation.main(["compare", fake("full", 100, 50), fake("limited", 10, 50), fake("short", 100, 8), fake("same", 100, 50)])
    out = capsys.readouterr().out
    assert "limited (lora) [other settings]" in out and "short (lora) [other settings]" in out
    assert "same (lora) [other" not in out and "max_new_tokens 8" in out and "10 examples per task" in out


def test_the_command_a_study_prints_reproduces_it(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["study.py", "s", "--methods", "lora", "--dir", "/my place", "--", "--lr", "1e-3"])
    assert study.study_command() == "python study.py s --methods lora --dir '/my place' -- --lr 1e-3"
    assert study.study_command(keep_dir=False) == "python study.py s --methods lora -- --lr 1e-3"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_study_s_child_ends_with_it(tmp_path):
    pid_file = tmp_path / "child"
    parent = subprocess.Popen([sys.executable, "-c", f"""
import subprocess, sys, time
sys.path.insert(0, {str(ROOT)!r})
import study
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True,
                         preexec_fn=study.end_with_parent)
open({str(pid_file)!r}, "w").write(str(child.pid))
time.sleep(120)
"""])
    for _ in range(100):
        if pid_file.is_file() and pid_file.read_text():
            break
        time.sleep(0.1)
    child = int(pid_file.read_text())
    parent.kill()  # killed hard: no handler runs in the study
    parent.wait()
    for _ in range(100):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        if Path(f"/proc/{child}/stat").is_file() and Path(f"/proc/{child}/stat").read_text().split()[2] == "Z":
            break  # ended, not yet reaped by init
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the child outlived the study")


# ----------------------------------------------------------------------------------------------
# 4. Outcomes: a run gone wrong stops; every check up front


def test_a_run_that_blows_up_stops_without_a_checkpoint(tiny_trainable, tmp_path):
    result = run_cli("train.py", "--model", tiny_trainable, "--out", tmp_path / "run", *FAST, "--method", "lora", "--lr", "1e30")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "the adapter has blown up" in result.stderr and "Lower --lr" in result.stderr
    assert not (tmp_path / "run" / "checkpoint").exists() and not (tmp_path / "run" / "adapter.safetensors").exists()


def test_a_stalled_run_stops(tiny_trainable, tmp_path, monkeypatch):
    original = train.train_step

    def zero_gradient(*args):  # the loss stays, the gradient is exactly 0: nothing can be learned
        return {**original(*args), "grad_norm": 0.0}

    monkeypatch.setattr(train, "train_step", zero_gradient)
    monkeypatch.setattr(runs, "EXPLODED", float("inf"))
    with pytest.raises(runs.Stop, match=r"training has stalled at step 3: the gradient is exactly 0 for 3 steps"):
        train.run(train.parse_args(["--model", str(tiny_trainable), "--out", str(tmp_path / "run"), *FAST]), 0, 1,
                  torch.device("cpu"))


def test_every_check_comes_before_any_work(tiny_trainable, tmp_path, capsys):
    short = tmp_path / "short"
    shutil.copytree(tiny_trainable, short)
    cfg = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 150}))
    argv = ["--data", "classroom", "--tasks", "sort_ascending", "--limit", "4", "--eval-limit", "1", "--device", "cpu"]
    err = refused(capsys, train.main, ["--model", short, "--out", tmp_path / "r1", *argv, "--max-len", "140",
                                       "--max-answer-len", "10", "--max-new-tokens", "50"])
    assert "the evaluation would decode past the model's positions" in err and not (tmp_path / "r1").exists()
    err = refused(capsys, train.main, ["--model", tiny_trainable, "--out", tmp_path / "r2", *argv, "--targets", "lm_head"])
    assert "--targets lm_head matches no linear layer" in err and not (tmp_path / "r2").exists()
    nan = tmp_path / "nan"
    shutil.copytree(tiny_trainable, nan)
    weights = load_file(nan / "model.safetensors")
    key = next(k for k in weights if "mlp" in k)
    weights[key][0, 0] = float("nan")
    save_file(weights, nan / "model.safetensors", metadata={"format": "pt"})
    err = refused(capsys, train.main, ["--model", nan, "--out", tmp_path / "r3", *argv])
    assert f"the base model's tensor '{key}' holds NaN or infinite values" in err
    assert not (tmp_path / "r3" / "metrics_before.json").exists()  # found at loading, before the base evaluation
