"""A decoder-only transformer for Hugging Face checkpoints, written out top to bottom.

One `Transformer` covers the families the BADIT paper uses: Llama (incl. Llama-3 rope scaling),
Mistral, Qwen2 (q/k/v biases), Qwen3 (q/k norms) and Gemma-2 (scaled embeddings, (1 + w) norms,
extra norms, soft-capping, sliding windows). Module names follow Hugging Face's, so a checkpoint's
tensor `model.layers.3.mlp.gate_proj.weight` is our `layers.3.mlp.gate_proj.weight`, and adapters
target the same names PEFT users know (`gate_proj`).

Here: ModelArgs, the layers, the Transformer, the KV cache and generation. hf.py reads a checkpoint
(config.json into ModelArgs, the safetensors weights, the tokenizer) and picks the device and precision:

    model = hf.load_model(path, device=None, dtype=None)        path: a folder or a hub id (org/name)
    model(input_ids, attention_mask=None) -> logits (B, L, vocab)
    generate(model, input_ids, attention_mask=None, max_new_tokens=50, eos_token_id=None) -> ids

attention_mask is 0 on padding, wherever it is (data.py pads on the right), and positions count real
tokens only, so a row computes the same thing whatever padding it sits beside. With the padding on the
right and no cache, attention takes the fused kernel's causal path with no mask at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from checks import InputError

# torch's CPU sin, cos, exp, log, sqrt, tanh, ... call MKL's vector math library. The first of these calls in a
# process, when torch splits it over threads, now and then comes back about 1e-4 off on the main thread's share
# (torch 2.13.0+cpu: in 2 % to 15 % of processes; here the first forward's rotary cos, so a resumed run drifted
# from an uninterrupted one; later calls are exact). One call on one thread first, at import, leaves every later
# call exact, so that seeded runs repeat bit for bit (a resumed run equals an uninterrupted one: tests/test_bad_input.py).
torch.zeros(1).cos()


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class ModelArgs:
    """The architecture (gpt-fast's ModelArgs); hf.model_args reads it from a Hugging Face config.json."""

    model_type: str = "llama"
    vocab_size: int = 32000
    dim: int = 4096  # hidden_size
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32  # fewer than n_heads: grouped-query attention
    head_dim: int = 128
    hidden_dim: int = 11008  # intermediate_size of the MLP
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear" | "llama3", "factor": ..., ...}
    tie_embeddings: bool = False
    activation: str = "silu"  # or "gelu_pytorch_tanh" (Gemma-2)
    qkv_bias: bool = False  # Qwen2
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm on each head's queries and keys before rope
    attn_scale: float | None = None  # None: 1 / sqrt(head_dim); Gemma-2: 1 / sqrt(query_pre_attn_scalar)
    sliding_window: int | None = None
    sliding_layers: list[bool] = field(default_factory=list)  # which layers use the window
    # Gemma-2
    gemma_norms: bool = False  # RMSNorm scales by (1 + w); extra norms after attention and MLP
    embed_scale: bool = False  # embeddings multiplied by sqrt(dim)
    attn_softcap: float | None = None  # logits <- cap * tanh(logits / cap)
    final_softcap: float | None = None
    max_positions: int | None = None  # max_position_embeddings: the longest sequence the model was made for


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies (head_dim / 2,) of rotary embeddings, with linear or Llama-3 scaling."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = args.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    # Llama-3: slow down low frequencies by `factor`, keep high ones, interpolate in between.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


# ----------------------------------------------------------------------------------------------
# The model


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, add_one: bool = False):
        super().__init__()
        self.eps, self.add_one = eps, add_one
        self.weight = nn.Parameter(torch.zeros(dim) if add_one else torch.ones(dim))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.add_one:  # Gemma: scale by (1 + w) in float32, then cast
            return (h * (1.0 + self.weight.float())).type_as(x)
        return self.weight * h.type_as(x)  # Llama: cast, then scale


class KVCache:
    """Keys and values of every layer for up to max_len positions, filled left to right."""

    def __init__(self, args: ModelArgs, batch: int, max_len: int, device, dtype):
        shape = (batch, args.n_kv_heads, max_len, args.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.length = 0  # positions filled; advanced by Transformer.forward after all layers

    def layer(self, i: int):
        """What decoder layer i writes into and reads: (keys, values, positions filled), no index, so that
        every layer traces the same code (a compiled layer is compiled once, not once per layer)."""
        return self.k[i], self.v[i], self.length

    def rows(self, start: int, end: int) -> "KVCache":
        """The cache of rows start .. end - 1 (views: what a forward writes there lands in this cache)."""
        view = object.__new__(KVCache)
        view.k, view.v, view.length = [t[start:end] for t in self.k], [t[start:end] for t in self.v], 0
        return view


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def attention(q, k, v, mask, scale: float, softcap: float | None):
    """q (B, H, L, hd); k, v (B, Hkv, T, hd); mask (B, 1, L, T), True where a query may look, or None:
    causal (L = T), the fused kernel's fast path."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        # On the CPU the fused kernel is faster in float32 than in bf16 (causal forward + backward, 8 x 9
        # heads: 2.6 against 9.4 ms at 46 tokens, 9.8 against 18.0 at 128, equal at 512).
        with torch.autocast("cpu", enabled=False):
            return attention(q.float(), k.float(), v.float(), mask, scale, softcap).to(q.dtype)
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True)
    if mask is None:
        mask = torch.ones(q.size(2), k.size(2), dtype=torch.bool, device=q.device).tril()
    # Gemma-2 soft-caps the attention logits, which SDPA cannot do: write attention out.
    groups = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-2, -1)) * scale
    scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype) @ v


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.scale = args.attn_scale or args.head_dim**-0.5
        self.softcap = args.attn_softcap
        self.window = args.sliding_window if args.sliding_layers[layer] else None
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.o_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.norm_eps)

    def forward(self, x, cos, sin, mask, cache: tuple | None):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, L, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, L, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, L, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:  # KVCache.layer: write the new positions, attend over all filled ones
            keys, values, past = cache
            keys[:, :, past : past + L], values[:, :, past : past + L] = k, v
            k, v = keys[:, :, : past + L], values[:, :, : past + L]  # (B, Hkv, T, hd) with T = past + L
        y = attention(q, k, v, mask, self.scale, self.softcap)  # (B, H, L, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        if args.activation not in ("silu", "gelu_pytorch_tanh"):
            raise InputError(f"config.json: activation {args.activation!r} is not supported (silu, gelu_pytorch_tanh).")
        self.gelu = args.activation == "gelu_pytorch_tanh"
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=args.mlp_bias)

    def forward(self, x):
        gate = self.gate_proj(x)
        gate = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(gate * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.gemma = args.gemma_norms
        self.self_attn = Attention(args, layer)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps, args.gemma_norms)
        # Hugging Face's names: in Llama, `post_attention_layernorm` is the norm *before* the MLP;
        # Gemma-2 normalises the attention output with it and adds two norms around the MLP.
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps, args.gemma_norms)
        if args.gemma_norms:
            self.pre_feedforward_layernorm = RMSNorm(args.dim, args.norm_eps, add_one=True)
            self.post_feedforward_layernorm = RMSNorm(args.dim, args.norm_eps, add_one=True)

    def forward(self, x, cos, sin, masks, cache):
        mask = masks[self.self_attn.window]
        if self.gemma:
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_masks(attention_mask, past: int, L: int, windows: set) -> dict:
    """Causal + padding (+ sliding window) masks (B, 1, L, T), one per window size (None: full).

    Query i (at cache index past + i) sees key j when j <= i, key j is not padding, and, with a
    window w, the two are fewer than w tokens apart (counted in real tokens: generate's cache may hold
    padding between a prompt and its new tokens). Every query also sees itself, so a padding query has
    no empty row (its output is never used, but an empty row would make NaNs). With no cache and the padding on the
    right, a real query's earlier keys are all real: plain causal attention is exact there (the
    padding queries' outputs are never used), so no mask is made (None) and the fused kernel skips
    the upper triangle.
    """
    right_padded = past == 0 and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())
    T = attention_mask.size(1)
    q = torch.arange(past, past + L, device=attention_mask.device)[:, None]  # (L, 1)
    k = torch.arange(T, device=attention_mask.device)[None, :]  # (1, T)
    visible = (k <= q) & attention_mask.bool()[:, None, None, :]  # (B, 1, L, T)
    position = attention_mask.long().cumsum(-1)  # (B, T): real tokens up to and including each slot
    apart = (position[:, past:, None] - position[:, None, :])[:, None]  # (B, 1, L, T)
    masks = {}
    for w in windows:
        m = visible if w is None else visible & (apart < w)
        masks[w] = None if right_padded and w is None else m | (k == q)
    return masks


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, args.gemma_norms)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_frequencies(args), persistent=False)
        self.windows = {layer.self_attn.window for layer in self.layers}  # one mask per distinct window
        self.routing = None  # routing.Routing, once adapters are added: what they need of the batch (METHOD.md section 4)
        self.activation_checkpointing = False  # recompute each block in backward to save memory

    def compile_layers(self, backend: str = "inductor"):
        """torch.compile each decoder layer, whole (fullgraph: a graph break is an error) and with dynamic
        shapes (batch and length symbolic, so that one graph serves every batch). The layers share their
        compiled graphs: a layer's parameters, cache and kept gates are inputs to them, not constants baked in.
        The loop over layers, the masks and the logits stay eager."""
        # The kinds of call: grad or no grad, batch 1 or more, a new batch or a decoding step, a mask or the causal
        # kernel, a window or none, an input that needs grad or not: 10 to 22 graphs on the tiny models of the
        # tests, then no more, whatever the batches and lengths (tests/test_compile.py).
        # No duck shaping: a batch of 2 beside 2 KV heads must not make one symbol of the two (and a graph for 2).
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        torch.fx.experimental._config.use_duck_shape = False
        for layer in self.layers:
            layer.compile(backend=backend, fullgraph=True, dynamic=True)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.args, batch, max_len, self.lm_head.weight.device, self.lm_head.weight.dtype)

    def forward(self, input_ids, attention_mask=None, *, route_mask=None, task_ids=None, cache=None, logits_at=None):
        """input_ids (B, L) -> logits (B, L, vocab), or (n, vocab) at the n True positions of logits_at.

        attention_mask (B, past + L): 1 on real tokens, 0 on left padding, covering the cached
        positions too when decoding. route_mask (B, L): positions the adapters' routers average
        over (the prompt; default: every real token). task_ids (B,): an index per sequence for the
        adapters (CGC-LoRA's task). logits_at (B, L) bool: the loss needs logits on answer tokens only
        and generation on the last token only, and the vocabulary projection is the largest matmul
        of a small model. With bfloat16 weights the forward runs under autocast (METHOD.md section 8):
        matmuls in bf16, float32 where autocast keeps it, float32 adapter parameters cast per matmul.
        """
        bf16 = self.lm_head.weight.dtype == torch.bfloat16
        with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=bf16):
            return self._forward(input_ids, attention_mask, route_mask, task_ids, cache, logits_at)

    def _forward(self, input_ids, attention_mask, route_mask, task_ids, cache, logits_at):
        B, L = input_ids.shape
        past = cache.length if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, past + L, dtype=torch.long, device=input_ids.device)

        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, L)
        freqs = positions[..., None].float() * self.inv_freq.float()  # (B, L, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, L, hd), broadcast over heads
        masks = attention_masks(attention_mask, past, L, self.windows)

        h = self.embed_tokens(input_ids)  # (B, L, dim)
        if self.args.embed_scale:
            h = h * torch.tensor(self.args.dim**0.5, dtype=h.dtype)
        if self.routing is not None and past == 0:  # a new batch (training, scoring, prefill): route on its prompt
            self.routing.begin(attention_mask if route_mask is None else route_mask, task_ids, h)
        elif self.routing is not None:  # decoding: every adapter reuses the gate it computed at prefill
            self.routing.decoding()
        cos, sin = emb.cos().to(h.dtype), emb.sin().to(h.dtype)
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else cache.layer(i)
            if self.activation_checkpointing and self.training:
                h = checkpoint(layer, h, cos, sin, masks, kv, use_reentrant=False)
            else:
                h = layer(h, cos, sin, masks, kv)
        if cache is not None:
            cache.length += L

        h = self.norm(h if logits_at is None else h[logits_at])
        logits = self.lm_head(h)
        if self.args.final_softcap is not None:
            logits = self.args.final_softcap * torch.tanh(logits / self.args.final_softcap)
        return logits


# ----------------------------------------------------------------------------------------------
# Generation


@torch.no_grad()
def next_token(logits, temperature=0.0, top_p=1.0, generator=None):
    """(B, vocab) -> (B,): the most likely token (temperature 0), or one drawn from softmax(logits / temperature)
    restricted to the smallest set of tokens whose probability reaches top_p (nucleus sampling)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # the tokens after the nucleus is full
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0))
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def generate(model, input_ids, attention_mask=None, max_new_tokens=50, eos_token_id=None, pad_token_id=None, task_ids=None,
             mix=None, temperature=0.0, top_p=1.0, generator=None):
    """Decoding of a padded batch with a KV cache -> ids (B, L + new): the input, then the new tokens; greedy
    by default, sampled with temperature > 0 (and top_p, from `generator` for a seeded draw).

    Each row stops at its first EOS (eos_token_id: an id or a list of ids); rows that stopped are
    filled with pad_token_id (default: the first EOS id) until every row has stopped or
    max_new_tokens were produced. Adapters route on the prompt at prefill and keep that gate.
    mix: maps each step's next-token logits (B, vocab), rows in the input's order, to the logits of the
    distinct queries the tokens are chosen from and each row's query (ELREA's ensemble: every row takes its
    query's token, chosen from the weighted sum over the members).
    """
    B, L = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    eos = torch.tensor([] if eos_token_id is None else eos_token_id, device=input_ids.device).flatten()
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
    lengths = attention_mask.sum(1)
    order = torch.argsort(lengths, descending=True, stable=True)  # longest first; undone at the end
    back = torch.argsort(order)
    ids, mask = right_aligned(input_ids[order], attention_mask[order])
    cache = model.new_cache(B, L + max_new_tokens)
    logits = prefill(model, ids, mask, lengths[order], None if task_ids is None else task_ids[order], cache)
    cache.length = L
    out, done = [], torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        if mix is None:
            token = next_token(logits, temperature, top_p, generator)
        else:
            mixed, query = mix(logits[back])
            token = next_token(mixed, temperature, top_p, generator)[query][order]
        token = torch.where(done, torch.full_like(token, pad), token)
        out.append(token[:, None])
        done |= torch.isin(token, eos)
        if done.all() or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits = model(token[:, None], mask, cache=cache)[:, -1]
    return torch.cat([input_ids, torch.cat(out, dim=1)[back]], dim=1)


def right_aligned(ids, mask):
    """Move each row's real tokens to its start (padding at the end), keeping their order."""
    shift = torch.argsort(1 - mask, dim=1, stable=True)  # real positions first
    return ids.gather(1, shift), mask.gather(1, shift)


def prefill(model, ids, mask, lengths, task_ids, cache, similar=0.8):
    """The prompts' forward into the cache -> the logits at each row's last prompt token (B, vocab).

    Rows come sorted by length, right-aligned, and are run in groups of similar length (each at least
    `similar` x the group's longest), each group cut to its longest row: little of the work is padding
    (a batch of 8 SuperNI prompts of mixed tasks is 61 % padding when run whole), and with the padding
    on the right the attention is plain causal. Each group routes on its own prompts; their gates are
    then joined, so that decoding reuses them for every row."""
    B = len(ids)
    logits, gates, start = [], [], 0
    while start < B:
        end = start + 1
        while end < B and lengths[end] >= similar * lengths[start]:
            end += 1
        longest = int(lengths[start])
        last = F.one_hot(lengths[start:end] - 1, longest).bool()  # (rows, longest): each row's last token
        logits.append(model(ids[start:end, :longest], mask[start:end, :longest], cache=cache.rows(start, end),
                            task_ids=None if task_ids is None else task_ids[start:end], logits_at=last))
        if model.routing is not None:
            gates.append(model.routing.gates())
        start = end
    if model.routing is not None:
        model.routing.join(gates, task_ids)
    return torch.cat(logits)
