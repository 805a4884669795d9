"""model.py against Hugging Face transformers (the oracle) on tiny random checkpoints, in float32."""

import json
import shutil

import pytest
import torch

from routing import Routing
from conftest import FAMILIES, hf_model, hf_positions, left_padded_batch
from hf import load_model
from model import generate

LENGTHS = [21, 13, 17]  # longer than every sliding window and past llama3's original context


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_match_transformers(tiny_checkpoints, name):
    path = tiny_checkpoints[name]
    ids, mask = left_padded_batch(LENGTHS)
    ours = load_model(path, device="cpu", dtype=torch.float32)(ids, mask)
    with torch.no_grad():
        ref = hf_model(path)(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
    real = mask.bool()
    assert ours.shape == ref.shape
    assert ref[real].abs().max() > 0.5  # the random model produces non-trivial logits
    torch.testing.assert_close(ours[real], ref[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["llama3", "qwen2", "gemma2"])
def test_right_padding_takes_the_causal_path_and_matches_left_padding(tiny_checkpoints, name):
    """data.py pads on the right, where attention runs causal with no mask: the same logits as the
    masked path on the same rows padded on the left (windows and soft-caps included)."""
    from model import attention_masks, right_aligned

    model = load_model(tiny_checkpoints[name], device="cpu", dtype=torch.float32)
    ids, mask = left_padded_batch(LENGTHS)
    right_ids, right_mask = right_aligned(ids, mask)
    masks = attention_masks(right_mask, 0, right_ids.shape[1], model.windows)
    assert masks[None] is None and all(m is not None for w, m in masks.items() if w is not None)
    left, right = model(ids, mask), model(right_ids, right_mask)
    for b, n in enumerate(LENGTHS):
        torch.testing.assert_close(right[b, :n], left[b, -n:], atol=1e-5, rtol=0)


def test_row_is_independent_of_its_padding(tiny_checkpoints):
    model = load_model(tiny_checkpoints["gemma2"], device="cpu", dtype=torch.float32)
    ids, mask = left_padded_batch(LENGTHS)
    batched = model(ids, mask)
    n = LENGTHS[1]
    alone = model(ids[1:2, -n:])
    torch.testing.assert_close(batched[1, -n:], alone[0], atol=1e-5, rtol=0)


def test_old_style_rope_scaling_config(tiny_checkpoints, tmp_path):
    """Checkpoints saved before transformers 5 write rope_theta + rope_scaling {type: ...}."""
    src = tiny_checkpoints["llama3"]
    shutil.copytree(src, tmp_path / "old")
    cfg = json.loads((src / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    (tmp_path / "old" / "config.json").write_text(json.dumps(cfg))
    ids, mask = left_padded_batch(LENGTHS)
    torch.testing.assert_close(load_model(tmp_path / "old", device="cpu", dtype=torch.float32)(ids, mask), load_model(src, device="cpu", dtype=torch.float32)(ids, mask), atol=0, rtol=0)


@pytest.mark.parametrize("name", ["llama3", "qwen2", "gemma2"])
def test_greedy_generation_matches_transformers(tiny_checkpoints, name):
    path = tiny_checkpoints[name]
    ids, mask = left_padded_batch(LENGTHS, seed=1)
    ref_model = hf_model(path)
    common = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    free = ref_model.generate(ids, eos_token_id=None, **common)
    eos = int(free[0, ids.shape[1] + 4])  # a token row 0 produces mid-way: it must stop there
    ref = ref_model.generate(ids, eos_token_id=eos, **common)
    ours = generate(load_model(path, device="cpu", dtype=torch.float32), ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(ours, ref)
    assert (ours[0, ids.shape[1] + 5:] == 0).all()


def test_generation_without_cache_agrees(tiny_checkpoints):
    """The KV-cache path computes what a full forward over the grown sequence computes."""
    model = load_model(tiny_checkpoints["gemma2"], device="cpu", dtype=torch.float32)
    ids, mask = left_padded_batch(LENGTHS, seed=2)
    out = generate(model, ids, mask, max_new_tokens=6)
    full_mask = torch.cat([mask, torch.ones(len(LENGTHS), out.shape[1] - ids.shape[1], dtype=mask.dtype)], 1)
    logits = model(out[:, :-1], full_mask[:, :-1])
    assert torch.equal(logits[:, ids.shape[1] - 1:].argmax(-1), out[:, ids.shape[1]:])


class RoutingProbe(torch.nn.Module):
    """Stands in for an adapter: records the routing mask it sees on each call."""

    def __init__(self, linear, routing):
        super().__init__()
        self.linear, self.routing, self.seen = linear, routing, []

    def forward(self, x):
        self.seen.append(None if self.routing.mask is None else self.routing.mask.clone())
        return self.linear(x)


def test_routing_reaches_linears_per_model(tiny_checkpoints):
    """Adapters see the prompt mask at prefill, None while decoding; two models stay separate."""
    a, b = load_model(tiny_checkpoints["llama3"], device="cpu", dtype=torch.float32), load_model(tiny_checkpoints["llama3"], device="cpu", dtype=torch.float32)
    a.routing, b.routing = Routing(), Routing()  # as add_adapters makes them
    probe = RoutingProbe(a.layers[1].mlp.gate_proj, a.routing)
    a.layers[1].mlp.gate_proj = probe
    ids, mask = left_padded_batch(LENGTHS)
    generate(a, ids, mask, max_new_tokens=3)
    prefill = [m for m in probe.seen if m is not None]  # the prompts, in groups of rows of similar length
    assert sorted(int(n) for m in prefill for n in m.sum(1)) == sorted(LENGTHS)
    assert probe.seen[len(prefill):] == [None, None]
    route = mask.clone()
    route[:, -2:] = 0  # e.g. the answer tokens of a training batch
    b(ids, mask, route_mask=torch.ones_like(mask))
    a(ids, mask, route_mask=route)
    assert torch.equal(probe.seen[-1], route) and torch.equal(b.routing.mask, torch.ones_like(mask))


def test_activation_checkpointing_gives_the_same_gradients(tiny_checkpoints):
    ids, mask = left_padded_batch(LENGTHS)
    grads = []
    for checkpointing in (False, True):
        model = load_model(tiny_checkpoints["qwen3"], device="cpu", dtype=torch.float32).train()
        model.activation_checkpointing = checkpointing
        model(ids, mask)[mask.bool()].logsumexp(-1).sum().backward()
        grads.append(model.layers[0].mlp.gate_proj.weight.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=0)
