"""BADIT (METHOD.md sections 2 to 5), top to bottom in the order of METHOD.md: the expert layer, the SVD
initialisation of K orthogonal experts (the paper's BAD), the router, and DOG, the regrouping of the experts'
rank-1 components during training.

Every adapter of this project wraps a frozen nn.Linear (weight W, m x n) and adds N rank-1 components, stored as
one A (N x n) and one B (m x N), each weighted per sequence by a coefficient c_j (METHOD.md (2.1)):

    y = x W^T + s ((dropout(x) A^T) * c) B^T            s = alpha / r

and the methods differ only in N, in how A and B start and in where c comes from (`Adapter.coefficients`).
BADIT's layer is MoE: K experts of r components, c from a per-sequence router, A and B from the top singular
triplets of W, which becomes the frozen residual. The methods BADIT is compared with, and the one function that
adds any of them to a model, are in methods.py; saving, loading, the PEFT export and merging in adapter_files.py;
the router's data flow in routing.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from checks import InputError


# ----------------------------------------------------------------------------------------------
# The expert layer (METHOD.md section 2)


class Adapter(nn.Module):
    """A frozen linear plus N rank-1 components s B[:, j] A[j, :], weighted per sequence by c_j."""

    def __init__(self, base: nn.Linear, n_components: int, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        m, n = base.weight.shape
        dev = base.weight.device
        # Trainable parameters are kept in float32 whatever the model's dtype (cast in forward).
        self.A = nn.Parameter(torch.zeros(n_components, n, device=dev))
        self.B = nn.Parameter(torch.zeros(m, n_components, device=dev))
        self.rank, self.scaling = rank, alpha / rank
        self.dropout = nn.Dropout(dropout)

    def coefficients(self, x) -> torch.Tensor | None:
        """(batch, N) weight of each component for each sequence; None means all ones."""
        return None

    def forward(self, x):  # x (B, L, n)
        h = self.dropout(x) @ self.A.to(x.dtype).T  # (B, L, N)
        c = self.coefficients(x)
        if c is not None:
            h = h * c[:, None, :].to(h.dtype)
        return self.base(x) + (h @ self.B.to(x.dtype).T) * self.scaling  # (B, L, m)


# ----------------------------------------------------------------------------------------------
# The SVD initialisation: the paper's BAD (METHOD.md section 3)


def svd_init_experts(adapter: Adapter):
    """METHOD.md section 3: the N components start as the top N singular triplets of W0, in order.

    W0 = U diag(S) Vh; A[j] = sqrt(S_j / s) Vh[j], B[:, j] = sqrt(S_j / s) U[:, j], so that
    s B[:, j] A[j] = S_j u_j v_j^T; expert e gets triplets e r .. e r + r - 1 (expert 0 the largest).
    The frozen weight becomes the residual W0 - s B0 A0, so the model starts at its own function.
    """
    N = adapter.A.shape[0]  # add_adapters checked that N <= min(m, n)
    U, S, Vh = torch.linalg.svd(adapter.base.weight.float(), full_matrices=False)
    root = (S[:N] / adapter.scaling).sqrt()
    with torch.no_grad():
        adapter.A.copy_(root[:, None] * Vh[:N])
        adapter.B.copy_(U[:, :N] * root[None, :])
        adapter.A0.copy_(adapter.A)  # kept (buffers made by add_adapters): they define the residual
        adapter.B0.copy_(adapter.B)
    set_residual(adapter)


def set_residual(adapter: Adapter):
    """base.weight <- W0 - s B0 A0 (float32, then the model's dtype); deterministic given A0, B0."""
    W = adapter.base.weight
    W.data = (W.float() - adapter.scaling * adapter.B0 @ adapter.A0).to(W.dtype)


def kaiming_init(adapter: Adapter):
    """LoRA's init: A kaiming-uniform (a = sqrt 5, as nn.Linear), B = 0, so the update starts at 0."""
    nn.init.kaiming_uniform_(adapter.A, a=math.sqrt(5))
    nn.init.zeros_(adapter.B)


# ----------------------------------------------------------------------------------------------
# The router (METHOD.md section 4)


class MoE(Adapter):
    """loramoe, badit-noregroup, badit and badit-nobad: K experts of rank r and a per-sequence router (METHOD.md section 4).

    The gate is computed from the mean of the layer input over the routing positions (the prompt,
    never padding or answer tokens) once per sequence, and reused while decoding.
    """

    def __init__(self, base, num_experts, rank, alpha, dropout, routing, top_k=None):
        super().__init__(base, num_experts * rank, rank, alpha, dropout)
        self.num_experts, self.top_k, self.routing, self.kept = num_experts, top_k, routing, routing.keep()
        self.G = nn.Parameter(torch.zeros(num_experts, base.weight.shape[1], device=base.weight.device))  # K x n

    def coefficients(self, x):
        if self.routing.mask is None:  # decoding: the gate computed at prefill
            return self.kept.gate
        with torch.autocast(x.device.type, enabled=False):  # the router in float32 (METHOD.md section 8)
            m = self.routing.mask.float()[..., None]  # (B, L, 1)
            xbar = (x.float() * m).sum(1) / m.sum(1).clamp(min=1)  # (B, n) masked mean over the prompt
            g = torch.softmax(xbar @ self.G.T, dim=-1)  # (B, K)
        if self.top_k is not None:  # keep the k largest gates, renormalise to sum to 1
            kept = torch.zeros_like(g).scatter(1, g.topk(self.top_k, dim=-1).indices, 1.0)
            g = g * kept / (g * kept).sum(-1, keepdim=True)
        c = (self.num_experts * g).repeat_interleave(self.rank, dim=1)  # (B, N); 1 when uniform
        self.kept.gate = c
        return c


# ----------------------------------------------------------------------------------------------
# DOG: spherical k-means, batched over layers (METHOD.md section 5.3)


def _kmeans_pp(gram, u):
    """Greedy k-means++ on the sphere (as scikit-learn seeds k-means): each next seed is the best of
    a few candidates drawn with probability proportional to 1 - cos to the nearest seed so far,
    best meaning the smallest remaining sum of 1 - cos. Draws by inverse CDF from the uniforms
    u (b, k, trials). -> labels (b, N), each point with its most similar seed."""
    b, N, _ = gram.shape
    rows = torch.arange(b, device=gram.device)
    seeds = [(u[:, 0, 0] * N).long().clamp(max=N - 1)]
    nearest = gram[rows, seeds[0]]  # (b, N) cos to the nearest seed
    for i in range(1, u.shape[1]):
        cdf = (1 - nearest).clamp(min=0).cumsum(-1)  # (b, N)
        candidates = torch.searchsorted(cdf, u[:, i] * cdf[:, -1:]).clamp(max=N - 1)  # (b, trials)
        reach = torch.maximum(nearest[:, None, :], gram[rows[:, None], candidates])  # (b, trials, N)
        best = (1 - reach).sum(-1).argmin(-1)  # (b,)
        seeds.append(candidates[rows, best])
        nearest = reach[rows, best]
    seeds = torch.stack(seeds, 1)  # (b, k)
    return torch.gather(gram, 2, seeds[:, None, :].expand(b, N, -1)).argmax(-1)


def _best_moves(M, GM, sq, zz):
    """Dhillon et al.'s "first variation" (2002): per problem, the one point whose move to another
    cluster most increases the objective sum_k ||S_k||, where Lloyd iterations stop at a local
    optimum. Moving z_i from a to b changes ||S_a|| to sqrt(||S_a||^2 - 2 z_i.S_a + ||z_i||^2) and
    ||S_b|| to sqrt(||S_b||^2 + 2 z_i.S_b + ||z_i||^2): Gram entries again. Points alone in their
    cluster stay. M one-hot (b, N, k), GM = G M, sq (b, k) = ||S_k||^2, zz (b, N) = ||z_i||^2.
    -> point (b,), cluster (b,), and whether the move gains (b,)."""
    b, N, k = M.shape
    own_sq, own_dot = (M * sq[:, None, :]).sum(-1), (M * GM).sum(-1)  # (b, N)
    leave = (own_sq - 2 * own_dot + zz).clamp(min=0).sqrt() - own_sq.sqrt()
    join = (sq[:, None, :] + 2 * GM + zz[..., None]).clamp(min=0).sqrt() - sq.sqrt()[:, None, :]  # (b, N, k)
    alone = (M * M.sum(1, keepdim=True)).sum(-1) == 1  # (b, N)
    delta = (leave[..., None] + join).masked_fill(M.bool() | alone[..., None], -math.inf)
    best, flat = delta.view(b, -1).max(-1)
    return flat // k, flat % k, best > 1e-5  # float32 noise must not count as a gain


def _reseed_empty(labels, sim, k):
    """An empty cluster takes the point least similar to its centroid (rare: a loop is fine)."""
    own = sim.gather(2, labels[..., None])[..., 0]
    rows = torch.arange(labels.shape[0], device=labels.device)
    for c in range(k):
        empty = (labels == c).sum(-1) == 0
        if empty.any():
            worst = own.argmin(-1)
            labels[rows[empty], worst[empty]] = c
            own[rows[empty], worst[empty]] = math.inf
    return labels


def spherical_kmeans(x, k: int, n_init: int = 10, max_iter: int = 100, seed: int = 0):
    """Spherical k-means of x (N, D) or (L, N, D), all L problems and all restarts in one batch.

    Similarity is the cosine; centroids are normalised sums S_k of unit vectors; an empty cluster
    is re-seeded with the point least similar to its centroid; where assignments stop changing,
    the best single-point move is made (_best_moves) and iterations go on; it stops when nothing
    changes or after max_iter; per problem, the restart with the largest total cosine sum_k ||S_k||
    wins. With N much smaller than D it all runs on the N x N cosine (Gram) matrix, since
    z_i . c_k = (G M)_ik / ||S_k|| and ||S_k||^2 = (M^T G M)_kk for the one-hot assignment M: the
    D-dimensional data is read twice, for the Gram matrix and for the final centroids. Every
    problem uses the same random numbers, so a layer's result does not depend on the layers
    batched with it. Runs on x's device; the random numbers are drawn on the CPU, so every device
    starts from the same k-means++ draws.
    Returns labels (L, N) and unit centroids (L, k, D) (without the L axis for 2-d input).
    """
    X = x.float()[None] if x.dim() == 2 else x.float()
    L, N, _ = X.shape
    if not 1 <= k <= N:
        raise InputError(f"spherical_kmeans: k = {k} clusters for {N} points; need 1 <= k <= N.")
    dots = X @ X.transpose(1, 2)  # (L, N, N)
    inv_norm = 1 / dots.diagonal(dim1=1, dim2=2).sqrt().clamp(min=1e-12)  # (L, N): 1 / ||x_i||
    gram = (dots * inv_norm[:, :, None] * inv_norm[:, None, :]).repeat_interleave(n_init, dim=0)  # (b, N, N) cosines
    zz = gram.diagonal(dim1=1, dim2=2)  # 1, or 0 for a zero vector
    gen = torch.Generator().manual_seed(seed)
    trials = 2 + int(math.log(k))  # scikit-learn's number of candidates per seed
    u = torch.rand(n_init, k, trials, generator=gen).to(X.device).repeat(L, 1, 1)  # (b, k, trials)
    rows = torch.arange(L * n_init, device=X.device)
    labels = _kmeans_pp(gram, u)
    todo, g, z, lab = rows, gram, zz, labels  # the problems still changing, compacted as they finish
    clusters = torch.arange(k, device=X.device)
    for _ in range(max_iter):
        M = (lab[..., None] == clusters).to(g.dtype)  # (b, N, k) one-hot
        GM = g @ M  # z_i . S_k
        sq = (M * GM).sum(1)  # (b, k) ||S_k||^2
        sim = GM / sq.clamp(min=1e-24).sqrt()[:, None, :]  # cos(z_i, c_k)
        new = sim.argmax(-1)
        if (sq == 0).any() or ((new[..., None] == clusters).sum(1) == 0).any():
            new = _reseed_empty(new, sim, k)
        settled = (new == lab).all(-1)  # Lloyd is done there: try one move
        point, cluster, gain = _best_moves(M, GM, sq, z)
        move = settled & gain
        active = torch.arange(len(todo), device=X.device)
        new[active[move], point[move]] = cluster[move]
        labels[todo] = new
        changing = ~settled | move
        if not changing.any():
            break
        todo, g, z, lab = todo[changing], g[changing], z[changing], new[changing]

    M = F.one_hot(labels, k).to(gram.dtype)
    total = (M * (gram @ M)).sum(1).clamp(min=0).sqrt().sum(-1)  # sum_k ||S_k||
    best = total.view(L, n_init).argmax(1)
    labels = labels.view(L, n_init, N)[torch.arange(L, device=X.device), best]
    weights = F.one_hot(labels, k).to(X.dtype) * inv_norm[..., None]  # (L, N, k): sums of unit vectors
    centroids = F.normalize(weights.transpose(1, 2) @ X, dim=-1, eps=1e-12)
    return (labels[0], centroids[0]) if x.dim() == 2 else (labels, centroids)


# ----------------------------------------------------------------------------------------------
# DOG: exact balanced assignments to orthogonal targets, iterated (METHOD.md sections 5.2, 5.4-5.6)


def linear_assignment(cost):
    """Exact minimum-cost assignment of every problem in a batch: cost (b, n, n) -> col (b, n), row i taking
    column col[i], so that sum_i cost[i, col[i]] is least. The Hungarian algorithm in its shortest-augmenting-
    path form with row and column potentials u, v (Kuhn 1955; Jonker and Volgenant 1987), O(n^3), all b
    problems advanced in lockstep on cost's device: the Python loops run over rows and path steps, never over
    problems. 1-based columns; column 0 is the sentinel that starts each row's search."""
    b, n, _ = cost.shape
    a, dev = cost.double(), cost.device
    rows = torch.arange(b, device=dev)
    u, v = torch.zeros(b, n + 1, dtype=a.dtype, device=dev), torch.zeros(b, n + 1, dtype=a.dtype, device=dev)
    owner = torch.zeros(b, n + 1, dtype=torch.long, device=dev)  # owner[:, j]: the row (1-based) holding column j, 0: free
    way = torch.zeros(b, n + 1, dtype=torch.long, device=dev)  # the column before j on the shortest path
    for i in range(1, n + 1):
        owner[:, 0] = i
        j0 = torch.zeros(b, dtype=torch.long, device=dev)
        best = torch.full((b, n + 1), math.inf, dtype=a.dtype, device=dev)  # shortest reduced path to each column
        used = torch.zeros(b, n + 1, dtype=torch.bool, device=dev)
        searching = torch.ones(b, dtype=torch.bool, device=dev)
        while True:  # grow each problem's alternating tree from row i until it reaches a free column
            used[rows, j0] |= searching
            i0 = owner[rows, j0]
            reduced = a[rows, (i0 - 1).clamp(min=0)] - u[rows, i0][:, None] - v[:, 1:]  # (b, n)
            closer = searching[:, None] & ~used[:, 1:] & (reduced < best[:, 1:])
            best[:, 1:] = torch.where(closer, reduced, best[:, 1:])
            way[:, 1:] = torch.where(closer, j0[:, None], way[:, 1:])
            delta, j1 = torch.where(used[:, 1:], math.inf, best[:, 1:]).min(-1)
            delta = torch.where(searching, delta, 0.0)[:, None]
            u.scatter_add_(1, owner, torch.where(used, delta, 0.0))  # u[owner[j]] += delta for the tree's columns
            v -= torch.where(used, delta, 0.0)
            best = torch.where(used, best, best - delta)
            j0 = torch.where(searching, j1 + 1, j0)
            searching &= owner[rows, j0] != 0
            if not searching.any():
                break
        on_path = torch.ones(b, dtype=torch.bool, device=dev)
        while on_path.any():  # flip the augmenting path back to the sentinel
            j1 = way[rows, j0]
            owner[rows, j0] = torch.where(on_path, owner[rows, j1], owner[rows, j0])
            j0 = torch.where(on_path, j1, j0)
            on_path = j0 != 0
    col = torch.empty(b, n, dtype=torch.long, device=dev)
    return col.scatter_(1, owner[:, 1:] - 1, torch.arange(n, device=dev).expand(b, n))


def balanced_assignment(sim, r: int):
    """METHOD.md section 5, step 3: exactly r components per target, maximising sum_j sim[j, k(j)]: an exact linear
    assignment of the N components to N slots, each target repeated r times. sim (L, N, K), N = K r -> (L, N)."""
    L, N, K = sim.shape
    if N != K * r:
        raise InputError(f"balanced_assignment: {N} components cannot fill {K} experts of rank {r} exactly.")
    return linear_assignment(-sim.repeat_interleave(r, dim=2)) // r  # slot k r + s belongs to target k


def grouping_objective(Z, groups, K: int):
    """J = sum_k ||sum_{j in group k} g_j||^2 (METHOD.md section 5) of unit rows Z (L, N, D) -> (L,)."""
    return (F.one_hot(groups, K).to(Z.dtype).transpose(1, 2) @ Z).pow(2).sum((1, 2))


def orthogonal_targets(Z, groups, K: int):
    """METHOD.md section 5, step 2: the centroid matrix C (L, K, D), c_k = sum_{j in k} g_j, and its polar factor
    Q = U V^T from the thin SVD C = U S V^T: the orthonormal rows nearest to C, row k still group k's."""
    C = F.one_hot(groups, K).to(Z.dtype).transpose(1, 2) @ Z
    U, _, Vh = torch.linalg.svd(C, full_matrices=False)
    return U @ Vh


def dynamic_orthogonal_grouping(Z, r: int, n_init=10, max_iter=100, seed=0, max_rounds=10):
    """DOG, METHOD.md section 5, steps 1 to 4, on the unit gradient directions Z (L, N, D) of L layers at once.

    1. spherical k-means into K = N / r clusters, then the exact balanced assignment to its unit centroids;
    2. orthogonal targets Q from the centroid matrix of the current groups;
    3. the exact balanced assignment of the components to Q;
    4. 2-3 again until no layer's groups change (at most max_rounds rounds, the paper's 10); each layer keeps the round
       with the largest J (the start's included, so J never falls below the k-means start's).
    -> groups (L, N) in 0 .. K-1, the kept round's targets (L, K, D), and per layer J after k-means, J at
    the end and the rounds until its groups stopped changing."""
    L, N, _ = Z.shape
    K = N // r
    _, centroids = spherical_kmeans(Z, K, n_init, max_iter, seed)
    groups = balanced_assignment(Z @ centroids.transpose(1, 2), r)
    kept, targets, J = groups, centroids, grouping_objective(Z, groups, K)
    J_kmeans, rounds = J.clone(), torch.full((L,), max_rounds, device=Z.device)
    for t in range(max_rounds):
        Q = orthogonal_targets(Z, groups, K)
        new = balanced_assignment(Z @ Q.transpose(1, 2), r)
        J_new = grouping_objective(Z, new, K)
        better = J_new > J
        kept, targets, J = (torch.where(better[:, None], new, kept), torch.where(better[:, None, None], Q, targets),
                            torch.where(better, J_new, J))
        settled = (new == groups).all(1)
        rounds = torch.where(settled & (rounds == max_rounds), t + 1, rounds)
        if settled.all():
            break
        groups = new
    return kept, targets, {"J_kmeans": J_kmeans, "J_end": J, "rounds": rounds}


# ----------------------------------------------------------------------------------------------
# The regroup: the signal, the diagnostics, matching groups to experts, the permutation (METHOD.md 5.1, 5.7-5.10)


def adapters_of(model) -> dict[str, Adapter]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Adapter)}


def routed_adapters(model) -> dict[str, MoE]:
    return {name: a for name, a in adapters_of(model).items() if isinstance(a, MoE)}


def component_gradients(adapter: Adapter) -> torch.Tensor:
    """(N, n + m) float32: each rank-1 component's gradient z_j = [dL/dA[j, :] ; dL/dB[:, j]]."""
    return torch.cat([adapter.A.grad, adapter.B.grad.T], dim=1).float()


@torch.no_grad()
def accumulate_regroup_signal(model):
    """Call once per optimizer step, after backward and before zero_grad (gradients are already
    averaged over data-parallel ranks then). Adds each component's gradient direction z_j (float32) to a
    running sum, and keeps the last one."""
    for a in routed_adapters(model).values():
        if a.A.grad is None:
            continue
        z = component_gradients(a)  # (N, n + m)
        if not hasattr(a, "signal_sum"):
            a.register_buffer("signal_sum", torch.zeros_like(z), persistent=False)
            a.register_buffer("signal_last", torch.zeros_like(z), persistent=False)
        a.signal_sum += z
        a.signal_last.copy_(z)


@torch.no_grad()
def accumulate_angle_signal(model):
    """The angle diagnostic's own running sum of z_j (train.py --angles-every), for every routed method; called
    where accumulate_regroup_signal is. It reads the gradients and writes nothing else: the run is unchanged."""
    for a in routed_adapters(model).values():
        if a.A.grad is None:
            continue
        z = component_gradients(a)
        if not hasattr(a, "angle_sum"):
            a.register_buffer("angle_sum", torch.zeros_like(z), persistent=False)
        a.angle_sum += z


def expert_angles(Z, r: int):
    """Z (L, N, D) unit rows, expert e = rows e r .. e r + r - 1 -> (intra, inter) angles in degrees (L,).

    intra: arccos of the mean pairwise cosine within an expert, averaged over experts;
    inter: arccos of the mean pairwise cosine between the K normalised expert means.
    """
    L, N, D = Z.shape
    K = N // r
    E = Z.view(L, K, r, D)
    gram = E @ E.transpose(-1, -2)  # (L, K, r, r)
    off = gram.sum((-1, -2)) - gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    intra = torch.rad2deg(torch.arccos((off / max(r * (r - 1), 1)).clamp(-1, 1))).mean(-1)  # 90 when r = 1
    means = F.normalize(E.mean(2), dim=-1, eps=1e-12)  # (L, K, D)
    mg = means @ means.transpose(1, 2)
    inter_cos = (mg.sum((-1, -2)) - mg.diagonal(dim1=-2, dim2=-1).sum(-1)) / max(K * (K - 1), 1)
    return intra, torch.rad2deg(torch.arccos(inter_cos.clamp(-1, 1)))


@torch.no_grad()
def gradient_angles(model) -> dict:
    """The paper's Figure 4 quantities over training: per routed layer, the intra- and inter-expert angles
    (expert_angles) of the gradient directions summed since the last call (accumulate_angle_signal), which
    then restart. -> {"intra", "inter": means over layers, "per_layer": {"layer", "intra", "inter"}}."""
    layers = {name: a for name, a in routed_adapters(model).items() if hasattr(a, "angle_sum")}
    per_layer = {"layer": [], "intra": [], "inter": []}
    by_shape = {}
    for name, a in layers.items():
        by_shape.setdefault((tuple(a.angle_sum.shape), a.rank), []).append(name)
    for (_, r), names in by_shape.items():
        Z = F.normalize(torch.stack([layers[n].angle_sum for n in names]), dim=-1, eps=1e-12)  # (L, N, n + m)
        intra, inter = expert_angles(Z, r)
        per_layer["layer"] += names
        per_layer["intra"] += intra.tolist()
        per_layer["inter"] += inter.tolist()
    for a in layers.values():
        a.angle_sum.zero_()
    n = max(len(per_layer["layer"]), 1)
    return {"intra": sum(per_layer["intra"]) / n, "inter": sum(per_layer["inter"]) / n, "per_layer": per_layer}


def match_clusters_to_experts(labels, sim, r: int):
    """METHOD.md section 5, "Matching clusters to experts": k-means numbers its clusters arbitrarily, so
    give expert e the cluster sharing most members with it (an exact assignment on the K x K
    overlap matrix), ties broken by how similar the expert's current members are to the cluster's
    centroid. labels (L, N) k-means clusters, sim (L, N, K) -> cluster (L, K) matched to each expert."""
    L, N, K = sim.shape
    expert_now = (torch.arange(N, device=sim.device) // r).expand(L, N)
    members = F.one_hot(expert_now, K).float()  # (L, N, K): component j is in expert e now
    overlap = F.one_hot(labels, K).float().transpose(1, 2) @ members  # (L, K clusters, K experts)
    closeness = sim.float().transpose(1, 2) @ members  # sum of the expert's members' cosines, in [-N, N]
    score = overlap + closeness / (2 * N + 1)  # the tie-break never outweighs one shared member
    return linear_assignment(-score.transpose(1, 2))  # experts as rows


def permutation_in_place(expert, sim, r: int):
    """expert (L, N): each component's new expert, r each -> perm (L, N), new component i = old perm[i].

    A component whose expert does not change keeps its slot, so an unchanged partition is the
    identity; the newcomers of an expert take its free slots in descending similarity (METHOD.md section 5).
    """
    L, N = expert.shape
    position = torch.arange(N, device=expert.device).expand(L, N)
    stays = expert == position // r
    placed = sim.float().gather(2, expert[..., None])[..., 0]  # in [-1, 1]
    newcomers = torch.argsort(torch.where(stays, math.inf, expert * 4 - placed), dim=1, stable=True)
    free_slots = torch.argsort(torch.where(stays, math.inf, position.float()), dim=1, stable=True)
    perm = torch.where(stays, position, -1)
    moving = torch.arange(N, device=expert.device) < (~stays).sum(1, keepdim=True)  # the first n of each sorted list
    perm[moving.nonzero()[:, 0], free_slots[moving]] = newcomers[moving]
    return perm


@torch.no_grad()
def permute_components(adapter: Adapter, perm, optimizer=None):
    """A <- A[perm], B <- B[:, perm], and the same for their gradients, optimizer state (AdamW's exp_avg,
    exp_avg_sq) and gradient accumulators, so the next step continues as if training had used this order."""
    for p, dim in ((adapter.A, 0), (adapter.B, 1)):
        tensors = [p] + ([p.grad] if p.grad is not None else [])
        if optimizer is not None:
            tensors += [v for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v) and v.shape == p.shape]
        for t in tensors:
            t.copy_(t.index_select(dim, perm))
    for name in ("signal_sum", "signal_last", "angle_sum"):  # the gradient accumulators (rows = components)
        if hasattr(adapter, name):
            getattr(adapter, name).copy_(getattr(adapter, name).index_select(0, perm))


def reset_regroup_signal(model):
    """Start the signals afresh: at the start of a training phase (a new task of the continual setting)."""
    for a in routed_adapters(model).values():
        for name in ("signal_sum", "signal_last", "angle_sum"):
            if hasattr(a, name):
                delattr(a, name)


REGROUP_STATS = ("intra_before", "intra_after", "inter_before", "inter_after", "J_start", "J_kmeans", "J_end", "rounds",
                 "moved")

@torch.no_grad()
def regroup(model, optimizer=None, signal: str = "accumulated", n_init: int = 10, max_iter: int = 100, seed: int = 0,
            sync=None) -> dict:
    """Regroup every routed adapter's rank-1 components by DOG on their gradient directions (METHOD.md section 5).

    signal: "accumulated" (summed since the last regroup, the default) or "last" (the last optimizer
    step's gradient only, the authors' code's behaviour, METHOD.md section 9). seed: the k-means++ draws'; train.py derives it
    from (run seed, phase, regroup index), so that successive regroups do not reuse the same draws. Layers
    of equal shape are grouped in one batch on the parameters' device (dynamic_orthogonal_grouping); the
    groups are matched to the current experts, and each layer's components are permuted in place. sync
    (data parallel): maps {layer: permutation} to the permutations to apply, e.g. rank 0's everywhere. The
    permutation is applied to A, B, their gradients and optimizer state; the router G is left unchanged;
    the signal restarts. Returns the diagnostics of METHOD.md section 5 (REGROUP_STATS) averaged over layers
    (moved: the total, and moved_mean), per layer (with the layers' names), and each layer's permutation.
    """
    if signal not in ("accumulated", "last"):
        raise InputError(f"regroup signal must be 'accumulated' or 'last', not {signal!r}.")
    layers = {name: a for name, a in routed_adapters(model).items() if hasattr(a, "signal_sum")}
    if not layers:
        raise InputError("regroup: no gradient signal yet; call accumulate_regroup_signal(model) after each backward.")
    by_shape = {}
    for name, a in layers.items():
        by_shape.setdefault((tuple(a.A.shape), tuple(a.B.shape), a.rank), []).append(name)

    stats = {key: [] for key in ("layer",) + REGROUP_STATS}
    permutations = {}
    for (_, _, r), names in by_shape.items():
        Z = torch.stack([layers[n].signal_sum if signal == "accumulated" else layers[n].signal_last for n in names])
        Z = F.normalize(Z, dim=-1, eps=1e-12)  # (L, N, n + m)
        L, N, _ = Z.shape
        K, now = N // r, (torch.arange(N, device=Z.device) // r).expand(L, N)
        groups, targets, dog = dynamic_orthogonal_grouping(Z, r, n_init, max_iter, seed)
        sim = Z @ targets.transpose(1, 2)  # (L, N, K): cosine of each component to each group's target
        group_of = match_clusters_to_experts(groups, sim, r)  # (L, K): the group expert e takes
        expert = torch.argsort(group_of, dim=1).gather(1, groups)  # each component's new expert
        perm = permutation_in_place(expert, sim.gather(2, group_of[:, None, :].expand(L, N, K)), r)
        for when, z in (("before", Z), ("after", Z.gather(1, perm[..., None].expand_as(Z)))):
            intra, inter = expert_angles(z, r)
            stats[f"intra_{when}"] += intra.tolist()
            stats[f"inter_{when}"] += inter.tolist()
        stats["J_start"] += grouping_objective(Z, now, K).tolist()
        stats["J_kmeans"] += dog["J_kmeans"].tolist()
        stats["J_end"] += dog["J_end"].tolist()
        stats["rounds"] += dog["rounds"].tolist()
        stats["moved"] += (expert != now).sum(1).tolist()  # changed expert
        stats["layer"] += names
        permutations.update(zip(names, perm))
    if sync is not None:
        permutations = sync(permutations)
    for name, p in permutations.items():
        permute_components(layers[name], p, optimizer)
        layers[name].signal_sum.zero_()
    out = {key: sum(stats[key]) / len(stats[key]) for key in REGROUP_STATS}
    out["moved_mean"], out["moved"] = out["moved"], sum(stats["moved"])
    return {**out, "per_layer": stats, "permutations": {n: p.tolist() for n, p in permutations.items()}}
