"""torch.compile of the decoder layers (Transformer.compile_layers): every method's layer traces whole
(fullgraph), the graphs stop growing once each kind of call has been seen, whatever the batch and length,
and a compiled run trains as the eager one does."""

import copy
import json

import pytest
import torch
from torch._dynamo.utils import counters

import methods
import train
from conftest import left_padded_batch
from methods import add_adapters
from hf import load_model
from model import generate


def adapted(path, method):
    model = load_model(path, device="cpu", dtype=torch.float32)
    kw = {"cgc": {"num_tasks": 3}, "o-lora": {"num_tasks": 2}, "gainlora": {"num_tasks": 2}, "elrea": {"members": 3}}
    add_adapters(model, method, num_experts=4, rank=2, dropout=0.0, **kw.get(method, {}))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # as after training: non-zero B, non-uniform routers and gates
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def step(model, B, L, seed):
    """A training forward and backward on a right-padded batch (B, L) -> logits, the adapters' gradients."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 60, (B, L), generator=g)
    mask = torch.ones_like(ids)
    mask[0, L - 3:] = 0  # one row padded
    route = mask.clone()
    route[:, L // 2:] = 0  # the answer half
    model.train()
    model.zero_grad()
    logits = model(ids, mask, route_mask=route, task_ids=torch.arange(B) % 3)
    logits.float().logsumexp(-1).mean().backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def decode(model, B, seed):
    ids, mask = left_padded_batch([3 + (5 * i + seed) % 11 for i in range(B)], vocab=60, seed=seed)
    model.eval()
    with torch.no_grad():
        return generate(model, ids, mask, max_new_tokens=4, task_ids=torch.arange(B) % 3)


def test_badit_layers_compile_whole_and_their_graphs_stop_growing(tiny_checkpoints):
    compiles_whole_and_stops_growing(tiny_checkpoints["llama3"], "badit")


@pytest.mark.slow
@pytest.mark.parametrize("method", methods.ADAPTERS)
def test_every_method_compiles_whole_and_its_graphs_stop_growing(tiny_checkpoints, method):
    compiles_whole_and_stops_growing(tiny_checkpoints["gemma2"], method)  # soft-capping, sliding windows: the most code


def compiles_whole_and_stops_growing(path, method):
    torch._dynamo.reset()
    counters.clear()
    eager = adapted(path, method)
    compiled = copy.deepcopy(eager)
    compiled.compile_layers(backend="eager")  # dynamo's tracing and guards, without inductor's compile time

    def both(shapes, batches):
        for i, (B, L) in enumerate(shapes):
            (a, ga), (b, gb) = step(eager, B, L, i), step(compiled, B, L, i)
            torch.testing.assert_close(b, a)
            for x, y in zip(gb, ga):
                torch.testing.assert_close(x, y)
        for B in batches:
            assert torch.equal(decode(compiled, B, B), decode(eager, B, B))

    both([(3, 17), (1, 9)], [5, 1])  # training, batch 1 too; generation: prefill groups of several sizes, decoding
    graphs = counters["stats"]["unique_graphs"]
    assert 0 < graphs <= 24  # a dozen kinds of call (compile_layers), each layer the same graphs
    both([(4, 23), (2, 30), (1, 13)], [7, 2])  # other batches and lengths of the same kinds: no new graph
    assert counters["stats"]["unique_graphs"] == graphs


FAST = ["--data", "classroom", "--tasks", "sort_ascending,sort_descending", "--limit", "8", "--batch-size", "4",
        "--epochs", "2", "--eval", "none", "--device", "cpu", "--dtype", "bfloat16"]


@pytest.mark.slow
def test_a_compiled_run_trains_as_the_eager_one(tiny_trainable, tmp_path):
    """Inductor on the CPU, bf16 autocast: the losses of `train.py --compile` follow eager's to bf16 rounding."""
    torch._dynamo.reset()
    curves = []
    for flag in ("--no-compile", "--compile"):
        out = tmp_path / flag
        train.main(["--model", str(tiny_trainable), "--out", str(out), *FAST, "--method", "badit", flag])
        curves.append([json.loads(line)["loss"] for line in (out / "log.jsonl").open() if '"loss"' in line])
    assert len(curves[0]) == 8
    torch.testing.assert_close(torch.tensor(curves[1]), torch.tensor(curves[0]), rtol=2e-2, atol=0)


def test_compile_is_on_by_default_for_the_papers_recipe_on_cuda_only():
    """The default the H200 measurements chose (README, Benchmarks): long runs on CUDA compile, the classroom job and
    the CPU do not."""
    assert train.default_compile("cuda", "superni") and train.default_compile("cuda", "/data/my-tasks")
    assert not train.default_compile("cuda", "classroom") and not train.default_compile("cpu", "superni")
