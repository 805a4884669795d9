"""A decoder-only transformer that loads Hugging Face checkpoints, written out top to bottom.

One `Transformer` covers the families the BADIT paper uses: Llama (incl. Llama-3 rope scaling),
Mistral, Qwen2 (q/k/v biases), Qwen3 (q/k norms) and Gemma-2 (scaled embeddings, (1 + w) norms,
extra norms, soft-capping, sliding windows). Module names follow Hugging Face's, so a checkpoint's
tensor `model.layers.3.mlp.gate_proj.weight` is our `layers.3.mlp.gate_proj.weight`, and adapters
target the same names PEFT users know (`gate_proj`).

Public API:
    load_model(path, device=None, dtype=None) -> Transformer      path: a folder or a hub id (org/name)
    load_tokenizer(path) -> Tokenizer
    model(input_ids, attention_mask=None) -> logits (B, L, vocab)
    generate(model, input_ids, attention_mask=None, max_new_tokens=50, eos_token_id=None) -> ids

attention_mask is 0 on padding, wherever it is (data.py pads on the right), and positions count real
tokens only, so a row computes the same thing whatever padding it sits beside. With the padding on the
right and no cache, attention takes the fused kernel's causal path with no mask at all.
"""

from __future__ import annotations

import json
import math
import platform
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint

from checks import InputError, MissingFile, command, positive_int
from data import format_prompt
from files import atomic_write, write_json

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2")
DEMO_MODEL = Path(__file__).resolve().parent / "checkpoints" / "SmolLM2-135M-Instruct"  # scripts/prepare_smollm2.py


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class ModelArgs:
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

    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config.json") -> ModelArgs:
        """Translate a Hugging Face config.json (old `rope_scaling` or new `rope_parameters`)."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise InputError(
                f"{source}: model_type {model_type!r} is not supported; "
                f"supported types: {', '.join(SUPPORTED_MODEL_TYPES)}."
            )

        def need(key):
            if key not in cfg:
                raise InputError(f"{source}: field {key!r} is missing; it is needed for a {model_type} model.")
            return cfg[key]

        dim, n_heads, n_layers = need("hidden_size"), need("num_attention_heads"), need("num_hidden_layers")
        rope = dict(cfg.get("rope_parameters") or {})
        rope_theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        rope.update(cfg.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise InputError(f"{source}: rope type {rope_type!r} is not supported (default, linear, llama3).")
        rope_scaling = None if rope_type == "default" else {**rope, "rope_type": rope_type}

        sliding_window = cfg.get("sliding_window")
        layer_types = cfg.get("layer_types")
        if model_type in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
            sliding_window = None
        if layer_types is None:  # older configs: derive what transformers derives
            if model_type == "gemma2":
                layer_types = ["sliding_attention" if i % 2 == 0 else "full" for i in range(n_layers)]
            elif model_type in ("qwen2", "qwen3"):
                first = cfg.get("max_window_layers", n_layers)
                layer_types = ["sliding_attention" if i >= first else "full" for i in range(n_layers)]
            else:  # mistral: every layer when a window is set; llama: none
                layer_types = ["sliding_attention" if model_type == "mistral" else "full"] * n_layers
        sliding_layers = [sliding_window is not None and t == "sliding_attention" for t in layer_types]

        gemma = model_type == "gemma2"
        head_dim = cfg.get("head_dim") or dim // n_heads
        attention_bias = cfg.get("attention_bias", False)
        return cls(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=head_dim,
            hidden_dim=need("intermediate_size"),
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            tie_embeddings=cfg.get("tie_word_embeddings", gemma),
            activation=(cfg.get("hidden_activation") if gemma else None) or cfg.get("hidden_act", "silu"),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type != "qwen2" and attention_bias,
            mlp_bias=cfg.get("mlp_bias", False),
            qk_norm=model_type == "qwen3",
            attn_scale=cfg["query_pre_attn_scalar"] ** -0.5 if gemma else None,
            sliding_window=sliding_window,
            sliding_layers=sliding_layers,
            gemma_norms=gemma,
            embed_scale=gemma,
            attn_softcap=cfg.get("attn_logit_softcapping") if gemma else None,
            final_softcap=cfg.get("final_logit_softcapping") if gemma else None,
            max_positions=cfg.get("max_position_embeddings"),
        )


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


class Routing:
    """What the adapters of badit.py need about the current batch beyond their input (SPEC section 4).

    One instance per model (`model.routing`), written by `Transformer.forward` and read by the
    adapted linears, which hold a reference to it: no global state, so two models in one process
    never see each other's batch. It stays set after forward returns, so that activation
    checkpointing recomputes the same gates during backward.
      mask:     (B, L) 1 on the positions a router averages over (the prompt); None while decoding
                with a KV cache, when each adapter reuses the gate it stored in `gates` at prefill.
      task_ids: (B,) an index per sequence: CGC-LoRA's task (its per-task gate), or the member of ELREA's
                ensemble that the row runs; or None.
      gates:    adapter -> gate computed for the current sequences.
      embeddings: (B, L, dim) the input embeddings of the current sequences (GainLoRA's gates pool them
                over the prompt, once for the whole model, where a router pools its own layer's input).
    """

    def __init__(self):
        self.mask: torch.Tensor | None = None
        self.task_ids: torch.Tensor | None = None
        self.gates: dict = {}
        self.embeddings: torch.Tensor | None = None

    def begin(self, mask: torch.Tensor, task_ids: torch.Tensor | None):
        self.mask, self.task_ids, self.gates, self.embeddings = mask, task_ids, {}, None

    def __deepcopy__(self, memo):  # a copied model starts with no batch (the gates hold autograd graphs)
        return Routing()


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

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        end = self.length + k.size(2)
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

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
        self.layer, self.n_heads, self.n_kv_heads, self.head_dim = layer, args.n_heads, args.n_kv_heads, args.head_dim
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

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, L, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, L, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, L, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, Hkv, T, hd) with T = past + L
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
        self.routing = Routing()
        self.activation_checkpointing = False  # recompute each block in backward to save memory

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.args, batch, max_len, self.lm_head.weight.device, self.lm_head.weight.dtype)

    def forward(self, input_ids, attention_mask=None, *, route_mask=None, task_ids=None, cache=None, logits_at=None):
        """input_ids (B, L) -> logits (B, L, vocab), or (n, vocab) at the n True positions of logits_at.

        attention_mask (B, past + L): 1 on real tokens, 0 on left padding, covering the cached
        positions too when decoding. route_mask (B, L): positions the adapters' routers average
        over (the prompt; default: every real token). task_ids (B,): an index per sequence for the
        adapters (CGC-LoRA's task). logits_at (B, L) bool: the loss needs logits on answer tokens only
        and generation on the last token only, and the vocabulary projection is the largest matmul
        of a small model. With bfloat16 weights the forward runs under autocast (SPEC section 8):
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
        if past == 0:  # a new batch of sequences (training, scoring, or prefill): route on its prompt
            self.routing.begin(attention_mask if route_mask is None else route_mask, task_ids)
        else:  # decoding: every adapter reuses the gate it computed at prefill
            self.routing.mask = None

        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, L)
        freqs = positions[..., None].float() * self.inv_freq.float()  # (B, L, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, L, hd), broadcast over heads
        masks = attention_masks(attention_mask, past, L, self.windows)

        h = self.embed_tokens(input_ids)  # (B, L, dim)
        if self.args.embed_scale:
            h = h * torch.tensor(self.args.dim**0.5, dtype=h.dtype)
        if past == 0:
            self.routing.embeddings = h
        cos, sin = emb.cos().to(h.dtype), emb.sin().to(h.dtype)
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                h = checkpoint(layer, h, cos, sin, masks, cache, use_reentrant=False)
            else:
                h = layer(h, cos, sin, masks, cache)
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
    logits, gates, start = [], {}, 0
    while start < B:
        end = start + 1
        while end < B and lengths[end] >= similar * lengths[start]:
            end += 1
        longest = int(lengths[start])
        last = F.one_hot(lengths[start:end] - 1, longest).bool()  # (rows, longest): each row's last token
        logits.append(model(ids[start:end, :longest], mask[start:end, :longest], cache=cache.rows(start, end),
                            task_ids=None if task_ids is None else task_ids[start:end], logits_at=last))
        for adapter, gate in model.routing.gates.items():
            gates.setdefault(adapter, []).append(gate)
        start = end
    model.routing.gates = {adapter: torch.cat(g) for adapter, g in gates.items()}
    model.routing.task_ids = task_ids
    return torch.cat(logits)


# ----------------------------------------------------------------------------------------------
# Loading checkpoints


def read_json(file, fix="re-download the checkpoint or fix the file"):
    """A JSON file we or Hugging Face wrote; a damaged one is an InputError that names it and says `fix`."""
    try:
        return json.loads(Path(file).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{file}: not valid JSON ({e}); {fix}.") from None


def read_safetensors(file, fix="re-download the checkpoint", device="cpu") -> dict:
    """All tensors of a safetensors file we wrote; a truncated or damaged file, or a tensor that is not finite,
    is an InputError that names it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(file, device=str(device))
    except (SafetensorError, OSError) as e:
        raise InputError(f"{file}: cannot be read as safetensors ({e}): the file is incomplete or damaged; {fix}.") from None
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise InputError(f"{file}: tensor {bad[0]!r}{f' and {len(bad) - 1} more' if len(bad) > 1 else ''} holds NaN or "
                         f"infinite values; {fix}.")
    return tensors


HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "*.safetensors",
             "model.safetensors.index.json"]


def checkpoint_dir(path) -> Path:
    """A checkpoint folder: a local path, or a Hugging Face hub id (org/name) that is not a local folder,
    whose config, tokenizer and safetensors files are downloaded into the standard HF cache."""
    if Path(path).is_dir():
        return Path(path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) and not str(path).startswith("."):
        return _hub_snapshot(str(path))
    raise MissingFile(
        f"model folder {path} does not exist: pass a Hugging Face checkpoint folder (config.json, *.safetensors, "
        f"tokenizer.json), a hub id such as Qwen/Qwen3-0.6B, or run `python scripts/prepare_smollm2.py` for the demo model."
    )


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))  # with the hub's progress bars
    except LocalEntryNotFoundError:
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise MissingFile(f"{repo_id} is not a local folder and is not in the Hugging Face cache {constants.HF_HUB_CACHE}, "
                          f"and the hub cannot be reached{offline}: download it on a machine with internet access "
                          f"(or unset HF_HUB_OFFLINE), or pass a local checkpoint folder.") from None
    except HfHubHTTPError as e:
        raise MissingFile(f"{repo_id} is not a local folder, and the Hugging Face hub refused it ({str(e).splitlines()[0]}): "
                          f"check the id, or log in (`hf auth login`) for a gated model.") from None


def read_model_args(path) -> ModelArgs:
    file = checkpoint_dir(path) / "config.json"
    if not file.is_file():
        raise MissingFile(f"{file} is missing: a checkpoint folder needs the config.json it was saved with.")
    return ModelArgs.from_hf_config(read_json(file), str(file))


def _checkpoint_files(path: Path) -> list[Path]:
    if (path / "model.safetensors.index.json").is_file():
        weight_map = read_json(path / "model.safetensors.index.json")["weight_map"]
        files = [path / name for name in sorted(set(weight_map.values()))]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif (path / "pytorch_model.bin").is_file():
        return [path / "pytorch_model.bin"]
    else:
        raise MissingFile(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin.")
    for file in files:
        if not file.is_file():
            raise MissingFile(f"{file} is missing (listed in model.safetensors.index.json).")
    return files


def _checkpoint_tensors(path: Path, shapes_only=False):
    """Yield (file, name, tensor) one at a time, so that only one tensor is in flight; with shapes_only,
    (file, name, shape) from the safetensors headers, reading no weights."""
    from safetensors import SafetensorError, safe_open

    for file in _checkpoint_files(path):
        if file.suffix == ".bin":  # weights_only: never unpickle arbitrary objects
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            for name in list(state):
                tensor = state.pop(name)
                yield file, name, tuple(tensor.shape) if shapes_only else tensor
            return
        try:
            f = safe_open(file, framework="pt")
        except (SafetensorError, OSError) as e:
            raise InputError(f"{file}: cannot be read as safetensors ({e}): the file is incomplete or damaged; "
                             f"re-download the checkpoint.") from None
        with f:
            for key in f.keys():
                yield file, key, tuple(f.get_slice(key).get_shape()) if shapes_only else f.get_tensor(key)


def _checked_name(args: ModelArgs, expected: dict, file, key, shape) -> str | None:
    """Our parameter name for checkpoint tensor `key`, or None for one we derive; refuses a stranger or a wrong shape."""
    name = key.removeprefix("model.")
    if name.endswith("rotary_emb.inv_freq") or (args.tie_embeddings and name == "lm_head.weight"):
        return None  # derived from the config (old Llama checkpoints store it) / tied to the embeddings
    if name not in expected:
        raise InputError(f"{file}: unexpected tensor {key!r}: a {args.model_type} model with this config.json has no such weight.")
    if tuple(shape) != tuple(expected[name].shape):
        raise InputError(f"{file}: tensor {key!r} has shape {tuple(shape)}, but config.json implies "
                         f"{tuple(expected[name].shape)}; do config.json and the weights come from the same checkpoint?")
    return name


def check_checkpoint(path) -> ModelArgs:
    """config.json and every tensor's name and shape (from the files' headers, no weights read), so that a run
    can refuse a broken checkpoint before it writes anything. -> the model's ModelArgs."""
    path = checkpoint_dir(path)
    args = read_model_args(path)
    with torch.device("meta"):
        expected = dict(Transformer(args).named_parameters())  # a tied lm_head appears once, as embed_tokens
    found = {_checked_name(args, expected, *t) for t in _checkpoint_tensors(path, shapes_only=True)}
    missing = sorted(set(expected) - found)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise InputError(f"{path}: the checkpoint lacks tensors {', '.join(missing[:5])}{more}.")
    return args


def hf_name(name: str) -> str:
    """A checkpoint's name of our parameter or module `name`: ours drop Hugging Face's leading "model."."""
    return name if name.startswith("lm_head") else "model." + name


CHECKPOINT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "chat_template.jinja")


def save_model(model, out_dir, source):
    """Write the model as a Hugging Face checkpoint folder: model.safetensors under the checkpoint's names (a
    tied lm_head once, as the embeddings), and config, generation config and tokenizer files copied from
    `source`, the checkpoint it was loaded from (its torch_dtype set to the weights' dtype)."""
    source, out = checkpoint_dir(source), Path(out_dir)
    tensors = {hf_name(n): p.detach().contiguous().cpu() for n, p in model.named_parameters()}  # tied: embed_tokens only
    atomic_write(out / "model.safetensors", lambda f: save_file(tensors, f, metadata={"format": "pt"}))
    for name in CHECKPOINT_FILES[1:]:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    write_json(out / "config.json", {**read_json(source / "config.json"), "torch_dtype": dtype})


def resolve_device(name=None) -> torch.device:
    """--device: cpu, cuda or cuda:N (default: cuda when available), checked before any work starts. A GPU
    always gets its index (cuda means cuda:0): torch.cuda.set_device refuses a bare "cuda"."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA device is available (torch {torch.__version__}); use --device cpu.")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise InputError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"--device {name}: only cpu and cuda are supported.")
    return torch.device("cuda", device.index or 0) if device.type == "cuda" else device


def native_bf16(device: torch.device) -> str | None:
    """What gives this device native bf16 matrix instructions, as torch reports it, or None (then bf16
    is emulated and slower than float32). Never guessed from a CPU's model name."""
    if device.type == "cuda":
        return "CUDA" if torch.cuda.is_bf16_supported() else None
    cpu = torch.cpu
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "AMX"
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "AVX512-BF16"
    if platform.machine().lower() in ("arm64", "aarch64") and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "Arm BF16"  # oneDNN's check is native on Arm; on x86 it also accepts AVX512 without BF16
    return None


def choose_dtype(device: torch.device, requested: str | None = None) -> tuple[str, str]:
    """SPEC section 8's precision: (dtype name, why). bfloat16 weights + autocast where the device has
    native bf16 matrix instructions, float32 elsewhere; requested ("float32" / "bfloat16") wins."""
    native = native_bf16(device)
    if requested:
        note = "" if requested == "float32" or native else " (emulated on this CPU: slower than float32)"
        return requested, f"{'bf16' if requested == 'bfloat16' else 'float32'}: requested with --dtype{note}"
    if native:
        return "bfloat16", f"bf16: native on this {'GPU' if device.type == 'cuda' else 'CPU'} ({native}); --dtype float32 to change"
    return "float32", f"float32: no native bf16 on this {device.type.upper()}; --dtype bfloat16 to change"


def load_model(path, device=None, dtype=None) -> Transformer:
    """Build the model on the meta device, then put each checkpoint tensor in place in turn.

    device: default CUDA when available; dtype (torch.dtype or name): default choose_dtype's, bfloat16
    where the device has native bf16 (the forward then runs under autocast), float32 elsewhere.
    """
    path = checkpoint_dir(path)
    args = check_checkpoint(path)
    device = resolve_device(device)
    dtype = getattr(torch, dtype or choose_dtype(device)[0]) if not isinstance(dtype, torch.dtype) else dtype
    with torch.device("meta"):
        model = Transformer(args)
    expected = dict(model.named_parameters())
    for file, key, tensor in _checkpoint_tensors(path):
        name = _checked_name(args, expected, file, key, tensor.shape)
        if name is None:
            continue
        module_name, _, leaf = name.rpartition(".")
        param = nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=expected[name].requires_grad)
        setattr(model.get_submodule(module_name), leaf, param)
    if args.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_frequencies(args).to(device)  # was built on the meta device
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """tokenizer.json through the `tokenizers` package, with special ids resolved as HF does.

    BOS around an encoded text: as transformers 5 does, tokenizer.json's own post-processor decides
    (Llama-3's and Gemma-2's add BOS, Qwen's and SmolLM's do not). eos_token_id is the tokenizer's EOS (the
    training target's end); stop_token_ids adds generation_config.json's EOS ids, which instruct
    models often extend (Llama-3's <|eot_id|>), and is what generation stops on.
    """

    def __init__(self, path):
        from tokenizers import Tokenizer as HFTokenizer

        path = checkpoint_dir(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise MissingFile(f"{file} is missing: badit reads the fast-tokenizer file tokenizer.json that HF checkpoints ship.")
        try:
            self.tk = HFTokenizer.from_file(str(file))
        except Exception as e:
            raise InputError(f"{file}: cannot be read by the tokenizers package ({e}).") from None
        optional = lambda name: read_json(path / name) if (path / name).is_file() else {}  # noqa: E731
        tok_cfg, gen_cfg, cfg = optional("tokenizer_config.json"), optional("generation_config.json"), optional("config.json")

        def token_id(key):  # tokenizer_config.json names the token; the configs give ids
            token = tok_cfg.get(key)
            token = token.get("content") if isinstance(token, dict) else token
            if token is not None and self.tk.token_to_id(token) is not None:
                return self.tk.token_to_id(token)
            ids = gen_cfg.get(key + "_id", cfg.get(key + "_id"))
            return ids[0] if isinstance(ids, list) else ids

        self.bos_token_id = token_id("bos_token")
        self.eos_token_id = token_id("eos_token")
        if self.eos_token_id is None:
            raise InputError(f"{path}: no EOS token in tokenizer_config.json, generation_config.json or config.json.")
        pad = token_id("pad_token")
        self.pad_token_id = self.eos_token_id if pad is None else pad
        gen_eos = gen_cfg.get("eos_token_id", cfg.get("eos_token_id"))
        gen_eos = gen_eos if isinstance(gen_eos, list) else [] if gen_eos is None else [gen_eos]
        self.stop_token_ids = list(dict.fromkeys([self.eos_token_id, *gen_eos]))
        if cfg.get("vocab_size") and self.tk.get_vocab_size(with_added_tokens=True) > cfg["vocab_size"]:
            raise InputError(f"{file} has {self.tk.get_vocab_size(with_added_tokens=True)} tokens, more than the "
                             f"vocab_size {cfg['vocab_size']} of {path / 'config.json'}: the tokenizer does not belong "
                             f"to this checkpoint; use the tokenizer it was trained with.")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tk.encode(text, add_special_tokens=add_special_tokens).ids  # BOS where the post-processor adds it

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """(start, end) character span of each token of text, without special tokens."""
        return self.tk.encode(text, add_special_tokens=False).offsets

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)


def load_tokenizer(path) -> Tokenizer:
    return Tokenizer(path)


# ----------------------------------------------------------------------------------------------
# Command line: greedy generation from a checkpoint, on a SuperNI-style prompt by default


def main(argv=None):
    import argparse

    example = format_prompt(
        "In this task, you are given a movie review. Classify its sentiment as \"positive\" or \"negative\".",
        "The plot was thin, but the acting was wonderful and I left the cinema smiling.",
    )
    p = argparse.ArgumentParser(description="Greedy generation with a checkpoint (the demo model by default).")
    p.add_argument("--model", default=str(DEMO_MODEL), help="Hugging Face checkpoint folder or hub id (default: the demo model)")
    p.add_argument("--prompt", default=example, help="prompt text (default: a SuperNI-style example)")
    p.add_argument("--max-new-tokens", type=positive_int, default=50)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 where the device has native bf16 "
                   "(CUDA, AVX512-BF16, AMX), float32 elsewhere")
    args = p.parse_args(argv)
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype), load_tokenizer(args.model)
    ids = torch.tensor([tok.encode(args.prompt)], device=model.lm_head.weight.device)
    out = generate(model, ids, max_new_tokens=args.max_new_tokens, eos_token_id=tok.stop_token_ids, pad_token_id=tok.pad_token_id)
    print(args.prompt + tok.decode(out[0, ids.shape[1]:].tolist()))


if __name__ == "__main__":
    command(main)
