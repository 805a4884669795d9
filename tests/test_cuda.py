"""The CUDA paths: METHOD.md section 8's precision on a GPU, k-means on the GPU, resume, where a step waits for
the GPU, generation against transformers. Each test needs a CUDA device and is skipped without one; on a
GPU machine the default suite runs them (python -m pytest -m cuda runs them alone)."""

import gc
import json
import sys
import warnings

import pytest
import torch

import train
from badit import spherical_kmeans
from methods import METHODS, REGROUP_METHODS, add_adapters
from conftest import ROOT, cut_and_resume, hf_model, left_padded_batch
from hf import load_model
from model import generate
from test_badit import planted
from test_model import LENGTHS
from test_train import FAST, adapter_state_of, log_of, losses, one_step_keeps_float32_state

sys.path.insert(0, str(ROOT / "bench"))
from bench_kmeans import gradient_like  # noqa: E402

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ON_GPU = [a for a in FAST if a not in ("--dtype", "float32")]  # the default precision: bf16 with autocast
ON_GPU[ON_GPU.index("cpu")] = "cuda"


@pytest.mark.parametrize("signal", ["SmolLM2-shaped gradients", "overlapping planted clusters"])
def test_kmeans_on_cuda_gives_the_cpus_clusters(signal):
    """The regroup's clustering does not depend on where it runs: same seed, same signal, same clusters.
    Restarts that reach one partition under other cluster numbers tie up to float rounding, which differs
    between devices, so the numbers may differ: each point's cluster mates and centroid must not."""
    x = gradient_like(30, 24, 576 + 1536) if signal.startswith("SmolLM2") else planted(L=4, K=5, per=5, D=64, noise=0.6, seed=1)[0]
    k = 6 if signal.startswith("SmolLM2") else 5
    labels, centroids = spherical_kmeans(x, k, seed=3)
    cuda_labels, cuda_centroids = (t.cpu() for t in spherical_kmeans(x.cuda(), k, seed=3))
    same_cluster = lambda lab: lab[:, :, None] == lab[:, None, :]  # noqa: E731
    assert torch.equal(same_cluster(cuda_labels), same_cluster(labels))
    own = lambda c, lab: c.gather(1, lab[..., None].expand(-1, -1, c.shape[-1]))  # noqa: E731  (L, N, D)
    torch.testing.assert_close(own(cuda_centroids, cuda_labels), own(centroids, labels), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS + ("elrea",))
def test_every_method_trains_and_evaluates_on_cuda_in_bf16(tiny_trainable, tmp_path, method):
    out = tmp_path / method
    extra = ["--tasks", "sort_ascending,sort_descending,copy_words", "--clusters", "2", "--proj-dim", "64"] if method == "elrea" else []
    train.main(["--model", str(tiny_trainable), "--out", str(out), *ON_GPU, "--method", method, *extra])
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["precision"].startswith("bf16: native on this GPU")
    if method == "elrea":
        assert sum(json.loads((out / "elrea.json").read_text())["sizes"]) == 24  # every training example clustered
    else:
        steps = losses(out)
        assert steps and all(torch.isfinite(torch.tensor(loss)) for _, loss in steps)
        assert len([e for e in log_of(out) if "regroup" in e]) == (1 if method in REGROUP_METHODS else 0)
    metrics = json.loads((out / "metrics_test.json").read_text())
    assert set(metrics["per_task"]) == set(config["tasks"])


def test_a_bf16_step_on_cuda_keeps_adapters_optimizer_router_and_loss_in_float32(tiny_trainable):
    one_step_keeps_float32_state(tiny_trainable, "cuda")


def waits_in_a_step(model_dir, method) -> int:
    """How many times one bf16 forward + backward makes the host wait for the GPU (after a warm-up step)."""
    import data

    model = load_model(model_dir, device="cuda", dtype=torch.bfloat16)
    add_adapters(model, method, num_tasks=1)
    tok = train.load_tokenizer(model_dir)
    ex = data.encode_examples(tok, data.load_tasks("classroom", ["sort_ascending"], "train", 4), ["sort_ascending"], 256)
    x = data.collate(ex, tok.pad_token_id, "cuda")
    data.answer_loss(model, x, use_task_ids=True).backward()
    torch.cuda.synchronize()
    gc.collect()  # the counted step runs without garbage collection: only its own operations count
    gc.disable()
    # switched on outside the recording: the first switch warns that the mode is a "prototype [that does not]
    # detect all synchronizing operations", a message the count below would match
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            data.answer_loss(model, x, use_task_ids=True).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        gc.enable()
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "lora"])
def test_no_adapter_makes_the_gpu_wait(tiny_trainable, method):
    """A step waits for the GPU only where the model itself must (the padding check, picking the answer
    tokens, the loss's targets, once in the backward: 4 times), the same for every method: no router or
    gate adds a wait, which would stop the host from queueing work ahead of the GPU. On an H100 this
    passes, and fails (7 against 4) when a router reads one value back per layer."""
    assert waits_in_a_step(tiny_trainable, method) == waits_in_a_step(tiny_trainable, "lora")


def test_resume_on_cuda_equals_an_uninterrupted_run(tiny_trainable, tmp_path, monkeypatch):
    """Interrupted at step 3 of 12 and resumed, the run continues as if never stopped: the same dropout
    masks, batches and optimizer state. Not bitwise: the fused attention's backward on CUDA adds in a
    nondeterministic order, so two uninterrupted runs already differ in the last bits. A resume that
    lost the RNG state (other dropout masks) misses these tolerances by far."""
    extra = ["--method", "badit", "--epochs", "3", "--eval", "none", "--dropout", "0.3"]
    train.main(["--model", str(tiny_trainable), "--out", str(tmp_path / "full"), *ON_GPU, *extra])
    cut_and_resume(monkeypatch, ["--model", tiny_trainable, *ON_GPU, *extra], tmp_path / "cut", 3)
    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert [s for s, _ in full] == [s for s, _ in cut]
    assert [loss for _, loss in cut] == pytest.approx([loss for _, loss in full], rel=1e-3)
    for a, b in zip(adapter_state_of(tmp_path / "full"), adapter_state_of(tmp_path / "cut")):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("name", ["llama3", "qwen2", "gemma2"])
def test_greedy_generation_on_cuda_equals_transformers_in_float32(tiny_checkpoints, name):
    """The KV-cache decoding on CUDA, token for token (float32: no TF32 in either, so no near-tie flips)."""
    ids, mask = (t.cuda() for t in left_padded_batch(LENGTHS, seed=1))
    common = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    ref = hf_model(tiny_checkpoints[name]).cuda().generate(ids, eos_token_id=None, **common)
    ours = generate(load_model(tiny_checkpoints[name], device="cuda", dtype=torch.float32), ids, mask, max_new_tokens=12,
                    eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, ref)
