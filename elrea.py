"""ELREA, Ensembles of Low-Rank Expert Adapters (Li et al., ICLR 2025, arXiv 2502.00089, and "the thesis": its first
author's PhD thesis, Yinghao Li, Georgia Tech, 2025, chapter 5 and appendix D): the pipeline of METHOD.md
section 6.2 over train.py's training loop, and its ensemble decoding.

    python train.py --method elrea [--clusters 5] [--proj-dim 8192] [--feature-epochs 2] [--expert-lr LR]

BADIT clusters the rank-1 *components* of one adapter by their gradient directions; ELREA clusters the
training *examples* by theirs, trains one LoRA per cluster, and mixes the LoRAs per test query. In the
run directory:

    stage 1  base/       a LoRA on all training data (train.py's loop), which also keeps its adapter
                         and AdamW moments at the last --feature-epochs epoch ends (base/epoch_<e>/)
    stage 2  features.safetensors: per training example, the gradient of its prompt-only next-token
                         loss w.r.t. the base LoRA, turned into Adam's update direction with the base
                         run's moments (as LESS does), averaged over those epoch ends, projected by a
                         Rademacher matrix R / sqrt(d) generated block by block, unit length
    stage 3  clusters.safetensors, elrea.json: spherical k-means (badit.spherical_kmeans, BADIT's own)
                         into --clusters; while the largest cluster is more than 5x the smallest, it
                         is split in two, at most 3 times (the thesis used BIRCH; METHOD.md section 6)
    stage 4  experts/c<k>/: one LoRA per cluster, starting from the final base LoRA, trained on its
                         cluster only (--expert-lr, default 0.4 x --lr, the same epochs)
    stage 5  adapter.safetensors: the C + 1 LoRAs stacked as one methods.Ensemble. Per test query: its
                         feature as in stage 2, s_c = cosine to centroid c, w_c = softmax(z-score(s))_c,
                         w_base = 1 - max_c s_c, fixed per query; every greedy step takes the weighted
                         sum of the C + 1 LoRAs' logits, run as one batch of (C + 1) x B rows.

Every stage writes its result atomically, so `train.py --out RUN --resume` continues from the stage
that was under way. The training loop is train.py's, passed in as `train_adapter`.
"""

import json
import math
import os
import time
from argparse import Namespace
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from adapter_files import load_adapter_state, load_adapters, remove_adapters, save_adapters
from badit import adapters_of, spherical_kmeans
from methods import add_adapters
from checks import InputError, MissingFile
from data import collate
from files import atomic_write, read_json, read_safetensors

BLOCK = 4096  # columns of R made at a time: d_proj x 4096 signs
SIZE_RATIO, SIZE_ROUNDS = 5, 3  # the thesis's size rule
INCOMPLETE = "the run directory is incomplete; restore it, or start the run again with --overwrite"


# ----------------------------------------------------------------------------------------------
# Stage 2: gradient features


def prompt_losses(model, x):
    """(B,) each sequence's mean next-token cross-entropy over its prompt (instruction + input, no answer)."""
    prompt = x["route"].bool()
    predicts = prompt[:, 1:] & prompt[:, :-1]  # position t predicts prompt token t + 1
    at = torch.cat([predicts, torch.zeros_like(predicts[:, :1])], 1)
    logits = model(x["ids"], x["mask"], route_mask=x["route"], logits_at=at)  # (tokens, vocab)
    losses = F.cross_entropy(logits.float(), x["ids"][:, 1:][predicts], reduction="none")
    total = torch.zeros(len(prompt), device=losses.device).index_add(0, predicts.nonzero()[:, 0], losses)
    return total / predicts.sum(1).clamp(min=1)


def per_example_gradients(model, x):
    """(B, p): each example's gradient of its prompt loss w.r.t. every LoRA, flattened adapter by adapter
    (A, then B), from one batched backward. With h = x A^T and dy the gradient at the adapter's output,
    dB = s sum_t dy_t h_t^T and dA = s sum_t (dy_t B)^T x_t, sums over the example's own tokens: hooks
    keep each adapter's x and dy, and einsums give every example's gradient at once (no dropout)."""
    kept = {}

    def keep(adapter, inputs, output):
        kept[adapter] = [inputs[0].detach(), None]
        output.register_hook(lambda g: kept[adapter].__setitem__(1, g.detach()))

    adapters = list(adapters_of(model).values())
    hooks = [a.register_forward_hook(keep) for a in adapters]
    try:
        prompt_losses(model, x).sum().backward()  # example b's loss depends on row b only
    finally:
        for h in hooks:
            h.remove()
    grads = []
    with torch.no_grad():  # plain numbers from here: a graph would keep every later use alive
        for a in adapters:
            xin, dy = kept[a][0].float(), kept[a][1].float()  # (B, L, n), (B, L, m)
            h = xin @ a.A.T  # (B, L, r)
            grads.append(a.scaling * torch.einsum("blr,bln->brn", dy @ a.B, xin).flatten(1))  # dA (B, r n)
            grads.append(a.scaling * torch.einsum("blm,blr->bmr", dy, h).flatten(1))  # dB (B, m r)
    model.zero_grad(set_to_none=True)
    return torch.cat(grads, 1)


def adam_direction(g, m, v, betas, eps):
    """LESS: the update AdamW would take from gradient g with the run's moments m, v (no bias correction)."""
    b1, b2 = betas
    return (b1 * m + (1 - b1) * g) / ((b2 * v + (1 - b2) * g * g).sqrt() + eps)


def snapshot_moments(model, folder: Path):
    """The AdamW moments of an epoch-end checkpoint, flattened in per_example_gradients' order
    (the optimizer's parameters are the adapters' A and B, in module order)."""
    state = read_json(folder / "trainer.json", INCOMPLETE)
    tensors = read_safetensors(folder / "trainer.safetensors", INCOMPLETE, device=model.lm_head.weight.device)
    group = state["param_groups"][0]
    count = 2 * len(adapters_of(model))
    m = torch.cat([tensors[f"optimizer.{i}.exp_avg"].flatten() for i in range(count)])
    v = torch.cat([tensors[f"optimizer.{i}.exp_avg_sq"].flatten() for i in range(count)])
    return m, v, tuple(group["betas"]), group["eps"]


_SIGNS = {}


def rademacher_block(proj_dim: int, index: int, width: int, seed: int, dtype=torch.float32):
    """Columns index x BLOCK .. + width of R in {-1, +1}^(d x p), made on the CPU from a generator seeded by
    (seed, index), 8 signs per random byte: any block can be made again on its own, on any machine."""
    if dtype not in _SIGNS:  # byte b -> its 8 bits as +-1
        _SIGNS[dtype] = torch.tensor([[1.0 if b >> i & 1 else -1.0 for i in range(8)] for b in range(256)], dtype=dtype)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    random_bytes = torch.randint(0, 256, (proj_dim, (width + 7) // 8), generator=gen, dtype=torch.uint8)
    return _SIGNS[dtype][random_bytes.long()].view(proj_dim, -1)[:, :width]


@torch.no_grad()
def project(G, proj_dim: int, seed: int):
    """G (n, p) -> G R^T / sqrt(d) (n, d), float32; R is made block by block and never held whole."""
    out = torch.zeros(G.shape[0], proj_dim, device=G.device)
    for i, start in enumerate(range(0, G.shape[1], BLOCK)):
        R = rademacher_block(proj_dim, i, min(BLOCK, G.shape[1] - start), seed, G.dtype).to(G.device)
        out += (G[:, start:start + BLOCK] @ R.T).float()
    return out / math.sqrt(proj_dim)


def gradient_features(model, examples, snapshots, proj_dim: int, seed: int, pad_id: int, batch_size=8, desc="features"):
    """METHOD.md section 6, step 2: (n, d) unit features of `examples` from a model with LoRA adapters, whose
    adapter is left at the last snapshot. Built in chunks of about 2 GB of (n, p) Adam directions, kept
    in the model's precision (float32 or bfloat16)."""
    device = model.lm_head.weight.device
    model.eval()
    p = sum(a.A.numel() + a.B.numel() for a in adapters_of(model).values())
    dtype = torch.float32 if model.lm_head.weight.dtype == torch.float32 else torch.bfloat16
    chunk = max(1, 2**31 // (p * dtype.itemsize))
    moments = [snapshot_moments(model, folder) for folder in snapshots]
    features = []
    with tqdm(total=len(examples) * len(snapshots), desc=desc, unit="example", leave=False) as bar:
        for c in range(0, len(examples), chunk):
            part = examples[c:c + chunk]
            directions = torch.zeros(len(part), p, dtype=dtype, device=device)
            for folder, (m, v, betas, eps) in zip(snapshots, moments):
                load_adapter_state(model, folder / "adapter.safetensors")
                for s in range(0, len(part), batch_size):
                    g = per_example_gradients(model, collate(part[s:s + batch_size], pad_id, device))
                    directions[s:s + len(g)] += (adam_direction(g, m, v, betas, eps) / len(snapshots)).to(dtype)
                    bar.update(len(g))
            features.append(F.normalize(project(directions, proj_dim, seed), dim=1))
    return torch.cat(features)


# ----------------------------------------------------------------------------------------------
# Stage 3: clusters


def cluster_examples(features, clusters: int, seed: int):
    """Spherical k-means (badit.spherical_kmeans) into `clusters`, then the thesis's size rule: while the
    largest cluster holds more than 5x the smallest, split it in two, at most 3 times (the thesis went
    from 5 to 8-10 clusters). One split a round keeps an outlier from multiplying the clusters: with
    every oversized cluster split each round, one stray example made 5 clusters into 24.
    -> labels (n,), unit centroids (C, d): the normalised means of their members' features."""
    if not 1 <= clusters <= len(features):
        raise InputError(f"--clusters {clusters} must be between 1 and the {len(features)} training examples.")
    labels, _ = spherical_kmeans(features, clusters, seed=seed)
    for _ in range(SIZE_ROUNDS):
        sizes = torch.bincount(labels)
        largest = int(sizes.argmax())
        if sizes[largest] <= SIZE_RATIO * sizes[sizes > 0].min():
            break
        members = (labels == largest).nonzero()[:, 0]
        halves, _ = spherical_kmeans(features[members], 2, seed=seed)
        labels[members[halves == 1]] = int(labels.max()) + 1
    labels = torch.unique(labels, return_inverse=True)[1]  # consecutive cluster numbers
    centroids = F.normalize(torch.zeros(int(labels.max()) + 1, features.shape[1], device=features.device)
                            .index_add(0, labels, features), dim=1)
    return labels, centroids


def ensemble_weights(features, centroids):
    """METHOD.md section 6, step 5: (n, d), (C, d) unit -> (n, C + 1) weights [w_base, w_1 .. w_C]:
    s_c = cos(feature, centroid c); w_c = softmax of the z-scores of s across clusters (population std);
    w_base = 1 - max_c s_c. Not renormalised."""
    s = features.float() @ centroids.float().T  # (n, C)
    z = (s - s.mean(1, keepdim=True)) / s.std(1, unbiased=False, keepdim=True).clamp(min=1e-12)
    return torch.cat([1 - s.max(1, keepdim=True).values, torch.softmax(z, dim=1)], 1)


# ----------------------------------------------------------------------------------------------
# The pipeline


def check_args(args, train_examples: int, queries: int):
    """What the later stages would find wrong only after the base LoRA has trained, checked before the run
    starts: --clusters against the training examples of one pipeline, and --proj-dim against this machine's
    memory (each block of R is d_proj x BLOCK float32 signs, with an int64 index per 8 of them; the features
    of the training examples and of the queries are n x d_proj floats)."""
    if args.clusters > train_examples:
        raise InputError(f"--clusters {args.clusters} is more than the {train_examples} training examples "
                         f"{'of a task ' if args.setting == 'single' else ''}to cluster; lower --clusters.")
    need = args.proj_dim * (BLOCK * (4 + 1) + 4 * 2 * max(train_examples, queries))  # bytes: signs, indices, features
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): nothing to compare with
        return
    if need > have:
        raise InputError(f"--proj-dim {args.proj_dim}: ELREA's gradient features would need about {need / 2**30:,.0f} GiB "
                         f"of memory, and this machine has {have / 2**30:,.0f} GiB; lower --proj-dim (default 8192).")


def check_stages(run_dir: Path):
    """A stage's result may exist only when every earlier stage's does (a resume on a damaged run)."""
    results = [run_dir / "base" / "adapter.safetensors", run_dir / "features.safetensors",
               run_dir / "clusters.safetensors", run_dir / "adapter.safetensors"]
    for i, missing in enumerate(results):
        later = [r for r in results[i + 1:] if r.is_file()]
        if not missing.is_file() and later:
            raise MissingFile(f"{missing} is missing although {later[0]} exists: {INCOMPLETE}.")


def snapshot_dirs(run_dir: Path, args) -> list[Path]:
    folders = [run_dir / "base" / f"epoch_{e}" for e in range(args.epochs - args.feature_epochs + 1, args.epochs + 1)]
    for f in folders:
        if not (f / "trainer.json").is_file():
            raise MissingFile(f"{f} is missing: ELREA's features need the base run's epoch-end snapshots; {INCOMPLETE}.")
    return folders


def train_pipeline(model, args, train, run_dir: Path, rank: int, world: int, train_adapter) -> dict:
    """Stages 1 to 4 on the training examples, then the stacked ensemble adapter (stage 5's model);
    every stage whose result exists is skipped. train_adapter is train.py's: attach adapters (fresh,
    from a checkpoint when resuming, or from start_from) and run its training loop. Leaves the model
    without adapters. -> elrea.json's content (clusters, their sizes and task mix, stage times)."""
    check_stages(run_dir)
    lora = Namespace(**{**vars(args), "method": "lora"})
    record = read_json(run_dir / "elrea.json", INCOMPLETE) if (run_dir / "elrea.json").is_file() else {"seconds": {}}
    start = time.time()

    if not (run_dir / "base" / "adapter.safetensors").is_file():  # stage 1
        if rank == 0:
            print("elrea stage 1/4: the base LoRA on all training data")
        keep = range(args.epochs - args.feature_epochs + 1, args.epochs + 1)
        train_adapter(model, train, lora, run_dir / "base", keep_epochs=keep)
        record["seconds"]["base"] = time.time() - start
    remove_adapters(model)

    if not (run_dir / "clusters.safetensors").is_file():  # stages 2 and 3, on rank 0
        if rank == 0:
            record = features_and_clusters(model, args, train, run_dir, record)
        if world > 1:
            dist.barrier()
        record = read_json(run_dir / "elrea.json", INCOMPLETE)
    labels = read_safetensors(run_dir / "clusters.safetensors", INCOMPLETE)["labels"]
    if len(labels) != len(train):
        raise InputError(f"{run_dir / 'clusters.safetensors'} clusters {len(labels)} examples, the data has "
                         f"{len(train)}: the training data changed since the run started; {INCOMPLETE}.")

    experts = [run_dir / "experts" / f"c{k}" for k in range(int(labels.max()) + 1)]  # stage 4
    expert = Namespace(**{**vars(lora), "lr": args.expert_lr})
    for k, folder in enumerate(experts):
        if not (folder / "adapter.safetensors").is_file():
            members = [e for e, label in zip(train, labels.tolist()) if label == k]
            if rank == 0:
                print(f"elrea stage 4/4: expert {k + 1}/{len(experts)} on its cluster of {len(members)} examples")
            begin = time.time()
            train_adapter(model, members, expert, folder, start_from=run_dir / "base")
            record["seconds"][f"expert_{k}"] = time.time() - begin
        remove_adapters(model)

    if rank == 0:
        stack_ensemble(model, [run_dir / "base"] + experts, run_dir)
        atomic_write(run_dir / "elrea.json", lambda f: Path(f).write_text(json.dumps(record, indent=1)))
    if world > 1:
        dist.barrier()
    return record


def features_and_clusters(model, args, train, run_dir: Path, record: dict) -> dict:
    """Stages 2 and 3 (rank 0): features.safetensors, clusters.safetensors and elrea.json."""
    snapshots = snapshot_dirs(run_dir, args)
    load_adapters(model, snapshots[-1])
    if not (run_dir / "features.safetensors").is_file():
        print(f"elrea stage 2/4: gradient features of {len(train)} examples ({args.proj_dim} dimensions)")
        begin = time.time()
        features = gradient_features(model, train, snapshots, args.proj_dim, args.seed, args.pad_token_id)
        atomic_write(run_dir / "features.safetensors", lambda f: save_file({"features": features.cpu()}, f))
        record["seconds"]["features"] = time.time() - begin
        record["features_per_second"] = len(train) / record["seconds"]["features"]
    remove_adapters(model)
    features = read_safetensors(run_dir / "features.safetensors", INCOMPLETE)["features"]
    labels, centroids = cluster_examples(features, args.clusters, args.seed)
    mix = [dict(Counter(e.task for e, label in zip(train, labels.tolist()) if label == k).most_common())
           for k in range(len(centroids))]
    record |= {"clusters": len(centroids), "sizes": torch.bincount(labels).tolist(), "task_mix": mix,
               "snapshots": [str(s.relative_to(run_dir)) for s in snapshots], "proj_dim": args.proj_dim, "seed": args.seed}
    print(f"elrea stage 3/4: {len(centroids)} clusters (asked for {args.clusters}):")
    for k, (size, tasks) in enumerate(zip(record["sizes"], mix)):
        print(f"  cluster {k}: {size} examples: " + ", ".join(f"{t} {n}" for t, n in tasks.items()))
    atomic_write(run_dir / "clusters.safetensors", lambda f: save_file({"labels": labels.cpu(), "centroids": centroids.cpu()}, f))
    atomic_write(run_dir / "elrea.json", lambda f: Path(f).write_text(json.dumps(record, indent=1)))
    return record


@torch.no_grad()
def stack_ensemble(model, members: list[Path], run_dir: Path):
    """Stack the C + 1 trained LoRAs as one methods.Ensemble and save it as the run's adapter."""
    states = [read_safetensors(m / "adapter.safetensors", INCOMPLETE) for m in members]
    config = read_json(members[0] / "adapter_config.json", INCOMPLETE)
    hyper = {k: v for k, v in config.items() if k not in ("method", "active_rank", "trainable_params", "members")}
    add_adapters(model, "elrea", **{**hyper, "members": len(members)}, init=False)
    for name, a in adapters_of(model).items():
        a.A.copy_(torch.cat([s[f"{name}.A"] for s in states]))
        a.B.copy_(torch.cat([s[f"{name}.B"] for s in states], 1))
    save_adapters(model, run_dir)
    remove_adapters(model)


def prepare_ensemble(model, run_dir: Path, examples, pad_id: int):
    """Stage 5 for `examples` (the queries): their weights (n, C + 1), from a model without adapters,
    which is then given the run's ensemble adapter. The queries' features are computed exactly as the
    training examples' were (the same snapshots, moments and projection)."""
    run_dir = Path(run_dir)
    check_stages(run_dir)
    record = read_json(run_dir / "elrea.json", INCOMPLETE)
    snapshots = [run_dir / s for s in record["snapshots"]]
    load_adapters(model, snapshots[-1])
    features = gradient_features(model, examples, snapshots, record["proj_dim"], record["seed"], pad_id, desc="query features")
    remove_adapters(model)
    centroids = read_safetensors(run_dir / "clusters.safetensors", INCOMPLETE)["centroids"].to(features.device)
    load_adapters(model, run_dir)
    return ensemble_weights(features, centroids)


def mixer(weights):
    """generate()'s mix for rows laid out member-major (row a B + b is query b under member a): the B queries'
    next-token logits sum_a w[b, a] logits[a B + b], and each row's query, so that all C + 1 rows of a query
    take the one token chosen from its mixture."""
    M = weights.shape[1]

    def mix(logits):  # (M B, vocab) -> (B, vocab), (M B,)
        per_member = logits.float().view(M, -1, logits.shape[-1])  # (M, B, vocab)
        mixed = (weights.T.to(logits.device)[..., None] * per_member).sum(0)  # (B, vocab)
        return mixed, torch.arange(mixed.shape[0], device=logits.device).repeat(M)

    return mix
