"""The router's data flow (METHOD.md section 4): which positions a routed adapter averages over, the task ids
CGC and ELREA's ensemble read, and the gate that decoding reuses. Machinery, not method: badit.py's MoE and
methods.py's gated adapters hold a KeptGate each, and model.py's Transformer tells the Routing what the batch is."""

from __future__ import annotations

import copy

import torch


class Routing:
    """The router's data flow, from the prompt mask to the gate decoding reuses (METHOD.md section 4).

    1. data.collate marks each example's prompt: `route` (B, L) is 1 on the prompt's tokens, 0 on the
       answer and the padding (a router that saw the answer would route on what it is asked to produce).
    2. train.py and eval.py pass it to the model as route_mask; generate passes the prompt's attention mask.
    3. Transformer.forward, on a new batch (nothing cached yet: training, scoring, prefill), calls
       begin(route_mask, task_ids, input embeddings); on a decoding step, decoding().
    4. A routed adapter (MoE, GainLoRA) has a KeptGate from keep(). On a new batch its `coefficients`
       computes the gate from the masked mean of its own input (MoE) or of the embeddings (GainLoRA) and
       keeps it there; on a decoding step it returns the kept gate. CGC and the ELREA ensemble read task_ids.
    5. generate's prefill runs the prompts in groups of similar length, each a new batch, and join()s
       each adapter's kept gates over the groups, so that decoding reuses one gate per row.

    One instance per model (`model.routing`, made by add_adapters, held by its adapters): two models in
    one process never see each other's batch. It stays set after forward returns, so that activation
    checkpointing recomputes the same gates in backward.
    """

    def __init__(self):
        self.mask: torch.Tensor | None = None  # (B, L) the positions a router averages over; None while decoding
        self.task_ids: torch.Tensor | None = None  # (B,) CGC's task, or the ELREA member a row runs
        self.embeddings: torch.Tensor | None = None  # (B, L, dim) the model's input embeddings (GainLoRA)
        self.kept: list[KeptGate] = []  # one per routed adapter

    def keep(self) -> KeptGate:
        self.kept.append(KeptGate())
        return self.kept[-1]

    def begin(self, mask: torch.Tensor, task_ids: torch.Tensor | None, embeddings: torch.Tensor):
        self.mask, self.task_ids, self.embeddings = mask, task_ids, embeddings

    def decoding(self):
        self.mask = None

    def gates(self) -> list:
        return [k.gate for k in self.kept]

    def join(self, groups: list[list], task_ids: torch.Tensor | None):
        """prefill: the gates() of its row groups, in order -> each adapter's gate over all rows, for decoding."""
        for k, gates in zip(self.kept, zip(*groups)):
            k.gate = torch.cat(gates)
        self.task_ids = task_ids

    def __deepcopy__(self, memo):  # a copied model starts with no batch; its adapters keep their own gates
        copied = Routing()
        copied.kept = [copy.deepcopy(k, memo) for k in self.kept]
        return copied


class KeptGate:
    """A routed adapter's gate (B, N) for the current sequences: an object of its own, not an entry in a
    list or dict keyed by layer, so that every decoder layer looks the same to torch.compile."""

    gate: torch.Tensor | None = None

    def __deepcopy__(self, memo):  # the gate holds an autograd graph: a copy starts empty
        return KeptGate()
