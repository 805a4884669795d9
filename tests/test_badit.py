"""badit.py, methods.py, adapter_files.py: function-preserving init, SVD experts, k-means, exact regrouping, the router
by hand, saving, PEFT parity."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adapter_files import export_peft, load_adapters, merge_adapters, save_adapters
from badit import (accumulate_angle_signal, accumulate_regroup_signal, adapters_of, balanced_assignment,
                   dynamic_orthogonal_grouping, expert_angles, gradient_angles, grouping_objective, linear_assignment,
                   orthogonal_targets, permutation_in_place, regroup, routed_adapters, spherical_kmeans)
from methods import METHODS, add_adapters
from conftest import left_padded_batch
from hf import load_model
from model import generate

LENGTHS = [11, 7, 9]
TASKS = torch.tensor([0, 2, 1])


def adapted(path, method, **kw):
    model = load_model(path, device="cpu", dtype=torch.float32)
    kw = {"dropout": 0.0, **({"num_tasks": 3} if method == "cgc" else {}), **kw}
    add_adapters(model, method, **kw)
    return model


def randomize_adapters(model, seed=0, scale=0.05):
    """As after training: non-zero B, a non-uniform router."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def loss_of(model, ids, mask, task_ids=None):
    logits = model(ids, mask, task_ids=task_ids)
    return logits[mask.bool()].logsumexp(-1).mean() - logits[mask.bool()][:, 5].mean()


# ---------------------------------------------------------------------------------------------- init


@pytest.mark.parametrize("method", METHODS)
def test_every_method_starts_at_the_base_function(tiny_checkpoints, method):
    path = tiny_checkpoints["qwen3"]
    ids, mask = left_padded_batch(LENGTHS)
    base = load_model(path, device="cpu", dtype=torch.float32)(ids, mask)
    model = adapted(path, method, targets=("gate_proj", "q_proj"))
    out = model(ids, mask, task_ids=TASKS if method == "cgc" else None)
    torch.testing.assert_close(out, base, atol=2e-5, rtol=0)
    if method in ("pissa", "badit"):  # the adapters really hold part of the weight
        a = adapters_of(model)["layers.0.mlp.gate_proj"]
        assert a.B.abs().max() > 0.1


def test_svd_experts(tiny_checkpoints):
    path = tiny_checkpoints["llama3"]
    W0 = load_model(path, device="cpu", dtype=torch.float32).layers[1].mlp.gate_proj.weight.detach().clone()
    model = adapted(path, "badit", num_experts=6, rank=4, alpha=32)
    a = adapters_of(model)["layers.1.mlp.gate_proj"]
    A, B, s = a.A.detach(), a.B.detach(), a.scaling
    off = lambda M: M - torch.diag(torch.diagonal(M))  # noqa: E731
    assert off(A @ A.T).abs().max() < 1e-5 and off(B.T @ B).abs().max() < 1e-5  # orthogonal rows / columns
    S = torch.linalg.svdvals(W0)
    strengths = s * A.norm(dim=1) * B.norm(dim=0)  # singular value carried by each component
    torch.testing.assert_close(strengths, S[:24], atol=1e-5, rtol=1e-5)
    assert strengths[:4].min() > strengths[4:].max()  # expert 0 holds the largest
    torch.testing.assert_close(s * B @ A + a.base.weight, W0, atol=1e-6, rtol=0)


def test_routing_is_identical_in_training_and_generation(tiny_checkpoints):
    """The gate computed on the prompt at prefill is reused while decoding: a full forward over
    the generated text that routes on the prompt positions predicts the same tokens."""
    model = adapted(tiny_checkpoints["llama3"], "badit")
    randomize_adapters(model, scale=0.5)
    ids, mask = left_padded_batch(LENGTHS)
    out = generate(model, ids, mask, max_new_tokens=5)
    full_mask = torch.cat([mask, torch.ones(len(LENGTHS), 5, dtype=mask.dtype)], 1)
    route = torch.cat([mask, torch.zeros(len(LENGTHS), 5, dtype=mask.dtype)], 1)
    logits = model(out[:, :-1], full_mask[:, :-1], route_mask=route[:, :-1])
    assert torch.equal(logits[:, ids.shape[1] - 1:].argmax(-1), out[:, ids.shape[1]:])
    wrong = model(out[:, :-1], full_mask[:, :-1])  # routing over the answer too changes the gates
    assert not torch.allclose(wrong, logits, atol=1e-4)


# ---------------------------------------------------------------------------------------------- k-means


def planted(L, K, per, D, noise, seed):
    g = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(L, K, D, generator=g), dim=-1)
    labels = torch.arange(K).repeat_interleave(per)[torch.randperm(K * per, generator=g)].expand(L, -1)
    x = centers.gather(1, labels[..., None].expand(-1, -1, D)) + noise * torch.randn(L, K * per, D, generator=g)
    return x * torch.rand(L, K * per, 1, generator=g) * 3, labels  # arbitrary norms: only directions count


def test_kmeans_recovers_planted_clusters():
    from sklearn.metrics import adjusted_rand_score

    x, truth = planted(L=5, K=6, per=4, D=300, noise=0.02, seed=0)
    labels, centroids = spherical_kmeans(x, 6)
    for l in range(5):
        assert adjusted_rand_score(truth[l], labels[l]) == 1.0
    torch.testing.assert_close(centroids.norm(dim=-1), torch.ones(5, 6))


def test_kmeans_batched_equals_loop_and_is_seeded():
    x, _ = planted(L=4, K=5, per=5, D=64, noise=0.6, seed=1)  # overlapping clusters: restarts matter
    labels, centroids = spherical_kmeans(x, 5, seed=3)
    for l in range(4):
        one_labels, one_centroids = spherical_kmeans(x[l], 5, seed=3)
        assert torch.equal(one_labels, labels[l])
        torch.testing.assert_close(one_centroids, centroids[l])
    again = spherical_kmeans(x, 5, seed=3)
    assert torch.equal(again[0], labels) and torch.equal(again[1], centroids)


def test_kmeans_objective_not_worse_than_sklearn():
    """Mean cosine to the own centroid, over 8 hard (overlapping) problems, against the reference
    code's clustering: scikit-learn KMeans on the normalised vectors, one layer at a time."""
    from sklearn.cluster import KMeans

    L, D = 8, 200
    x, _ = planted(L=L, K=6, per=4, D=D, noise=0.8, seed=2)
    z = torch.nn.functional.normalize(x, dim=-1)
    labels, centroids = spherical_kmeans(x, 6)
    ours = (z * centroids.gather(1, labels[..., None].expand_as(z))).sum(-1).mean()
    ref = 0.0
    for l in range(L):
        lab = torch.as_tensor(KMeans(6, n_init=10, max_iter=100, random_state=0).fit(z[l].numpy()).labels_)
        c = torch.nn.functional.normalize(torch.zeros(6, D).index_add(0, lab, z[l]), dim=-1)
        ref += (z[l] * c[lab]).sum(-1).mean() / L
    assert ours >= ref


@settings(max_examples=60, deadline=None)
@given(L=st.integers(1, 4), K=st.integers(1, 7), r=st.integers(1, 5), seed=st.integers(0, 10**6))
def test_balanced_assignment_and_the_in_place_permutation(L, K, r, seed):
    from scipy.optimize import linear_sum_assignment

    sim = torch.rand(L, K * r, K, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    expert = balanced_assignment(sim, r)
    assert (torch.nn.functional.one_hot(expert, K).sum(1) == r).all()  # exactly r components per expert
    for l in range(L):  # as good as scipy's exact assignment of the components to r slots per expert
        slots = sim[l].repeat_interleave(r, dim=1).double().numpy()
        best = slots[linear_sum_assignment(slots, maximize=True)].sum()
        assert sim[l].double().gather(1, expert[l, :, None]).sum().item() == pytest.approx(best, abs=1e-9)

    perm = permutation_in_place(expert, sim, r)
    slot = torch.arange(K * r)
    assert torch.equal(perm.sort(1).values, slot.expand(L, -1))  # a permutation: nothing dropped or duplicated
    assert torch.equal(expert.gather(1, perm), (slot // r).expand(L, -1))  # slot i holds a member of expert i // r
    stays = expert == slot // r
    assert torch.equal(perm[stays], slot.expand(L, -1)[stays])  # a component that keeps its expert keeps its slot
    for l in range(L):
        for e in range(K):  # the newcomers of an expert fill its free slots in descending similarity
            new = [int(perm[l, i]) for i in range(e * r, (e + 1) * r) if not stays[l, i]]
            assert all(sim[l, a, e] >= sim[l, b, e] for a, b in zip(new, new[1:]))


def balanced_assignments(N, K):
    """Every assignment of N components to K groups of N / K each (brute force)."""
    import itertools

    r = N // K
    for perm in itertools.permutations(range(N)):
        groups = [0] * N
        for slot, j in enumerate(perm):
            groups[j] = slot // r
        if all(sorted(perm[k * r:(k + 1) * r]) == list(perm[k * r:(k + 1) * r]) for k in range(K)):
            yield groups  # each partition once: members of a group in increasing order


@pytest.mark.parametrize("seed", range(3))
def test_the_exact_balanced_assignment_is_optimal_against_brute_force(seed):
    N, K = 8, 4
    sim = torch.randn(2, N, K, generator=torch.Generator().manual_seed(seed)).double()
    expert = balanced_assignment(sim, N // K)
    for l in range(2):
        everything = list(balanced_assignments(N, K))
        assert len(everything) == 40320 // 2**4 and len(set(map(tuple, everything))) == len(everything)
        best = max(sum(sim[l, j, g] for j, g in enumerate(groups)) for groups in everything)
        assert sim[l].gather(1, expert[l, :, None]).sum().item() == pytest.approx(best.item(), abs=1e-12)


def greedy_fill(sim, r):
    """The regroup before DOG: place the most similar free (component, expert) pair until every expert holds r."""
    N, K = sim.shape
    expert, count, free = [-1] * N, [0] * K, sim.clone()
    for _ in range(N):
        j, e = divmod(int(free.argmax()), K)
        expert[j], count[e] = e, count[e] + 1
        free[j, :] = -float("inf")
        if count[e] == r:
            free[:, e] = -float("inf")
    return expert


def test_a_planted_case_where_the_greedy_fill_is_wrong_and_the_exact_assignment_is_right():
    # component 0 is nearest to target 0, but component 1 can only go there: greedy takes (0, 0) first and
    # leaves component 1 with target 1 (total 1.0 + 0.0), the exact assignment swaps them (0.9 + 0.9)
    sim = torch.tensor([[1.0, 0.9], [0.9, 0.0]])
    assert greedy_fill(sim, 1) == [0, 1]
    assert balanced_assignment(sim[None], 1)[0].tolist() == [1, 0]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 8), b=st.integers(1, 4), seed=st.integers(0, 10**6), ties=st.booleans())
def test_linear_assignment_is_exact_and_batched(n, b, seed, ties):
    from scipy.optimize import linear_sum_assignment

    g = torch.Generator().manual_seed(seed)
    cost = torch.randint(0, 3, (b, n, n), generator=g).double() if ties else torch.randn(b, n, n, generator=g).double()
    col = linear_assignment(cost)
    for k in range(b):
        assert sorted(col[k].tolist()) == list(range(n))
        rows, cols = linear_sum_assignment(cost[k].numpy())
        assert cost[k].gather(1, col[k, :, None]).sum().item() == pytest.approx(cost[k].numpy()[rows, cols].sum(), abs=1e-9)
        assert torch.equal(linear_assignment(cost[k:k + 1])[0], col[k])  # a problem's answer does not depend on its batch


@settings(max_examples=25, deadline=None)
@given(L=st.integers(1, 3), K=st.integers(2, 6), r=st.integers(1, 4), seed=st.integers(0, 10**6))
def test_dog_keeps_j_at_least_the_k_means_starts_and_its_targets_are_orthonormal(L, K, r, seed):
    Z = torch.nn.functional.normalize(torch.randn(L, K * r, 40, generator=torch.Generator().manual_seed(seed)), dim=-1)
    groups, targets, d = dynamic_orthogonal_grouping(Z, r, n_init=3, seed=seed)
    assert (torch.nn.functional.one_hot(groups, K).sum(1) == r).all()
    assert torch.allclose(grouping_objective(Z, groups, K), d["J_end"])
    assert (d["J_end"] >= d["J_kmeans"] - 1e-6).all()
    assert ((d["rounds"] >= 1) & (d["rounds"] <= 20)).all()
    Q = orthogonal_targets(Z, groups, K)
    torch.testing.assert_close(Q @ Q.transpose(1, 2), torch.eye(K).expand(L, K, K), atol=1e-5, rtol=0)


def test_orthogonal_targets_are_the_polar_factor_of_the_centroid_matrix():
    Z = torch.nn.functional.normalize(torch.randn(2, 12, 30, generator=torch.Generator().manual_seed(0)), dim=-1).double()
    groups = (torch.arange(12) // 3).expand(2, 12)
    Q = orthogonal_targets(Z, groups, 4)
    C = torch.nn.functional.one_hot(groups, 4).double().transpose(1, 2) @ Z
    for l in range(2):  # the orthonormal set nearest to C: no other rotation of Q comes closer
        for _ in range(20):
            R = torch.linalg.qr(torch.randn(4, 4, dtype=torch.double))[0]
            assert (C[l] - R @ Q[l]).norm() >= (C[l] - Q[l]).norm() - 1e-12


# ---------------------------------------------------------------------------------------------- regroup


def train_steps(model, batches, optimizer=None, accumulate=True):
    for seed in batches:
        ids, mask = left_padded_batch(LENGTHS, seed=seed)
        loss_of(model, ids, mask).backward()
        if accumulate:
            accumulate_regroup_signal(model)
        if optimizer is not None:
            optimizer.step()
        model.zero_grad()


@pytest.mark.parametrize("method", ["badit", "badit-nobad"])
def test_regroup_is_an_exact_permutation_and_keeps_uniform_routing_function(tiny_checkpoints, method):
    model = adapted(tiny_checkpoints["llama3"], method)
    ids, mask = left_padded_batch(LENGTHS)
    before_logits = model(ids, mask)
    train_steps(model, [1, 2])  # gradients only: G stays 0, routing uniform
    before = {n: (a.A.detach().clone(), a.B.detach().clone()) for n, a in routed_adapters(model).items()}
    diag = regroup(model)
    assert diag["moved"] > 0
    for name, a in routed_adapters(model).items():
        perm = torch.tensor(diag["permutations"][name])
        assert torch.equal(perm.sort().values, torch.arange(32))
        A, B = before[name]
        assert torch.equal(a.A, A[perm]) and torch.equal(a.B, B[:, perm])
    torch.testing.assert_close(model(ids, mask), before_logits, atol=1e-5, rtol=0)
    assert diag["intra_after"] < diag["intra_before"]  # experts became more coherent
    assert {"inter_before", "inter_after", "J_start", "J_kmeans", "J_end", "rounds"} <= set(diag)
    assert diag["J_end"] >= diag["J_kmeans"] - 1e-6 and len(diag["per_layer"]["J_end"]) == 3


def plant_signal(model, swap=None, seed=0):
    """A regroup signal already grouped by expert: component j points along expert j // r's direction
    (plus noise, with arbitrary norms); swap=(i, j) exchanges two components' directions."""
    g = torch.Generator().manual_seed(seed)
    for a in routed_adapters(model).values():
        N, D = a.A.shape[0], a.A.shape[1] + a.B.shape[0]
        centers = torch.nn.functional.normalize(torch.randn(N // a.rank, D, generator=g), dim=-1)
        owner = torch.arange(N) // a.rank
        if swap:
            owner[list(swap)] = owner[list(reversed(swap))]
        z = (centers[owner] + 0.05 * torch.randn(N, D, generator=g)) * torch.rand(N, 1, generator=g)
        a.register_buffer("signal_sum", z, persistent=False)
        a.register_buffer("signal_last", z.clone(), persistent=False)


def test_an_unchanged_partition_moves_nothing_even_with_a_trained_router(tiny_checkpoints):
    """METHOD.md section 5, "Matching clusters to experts": k-means numbers its clusters arbitrarily; matched
    to the current experts, a partition that is already grouped leaves every component in place."""
    model = adapted(tiny_checkpoints["llama3"], "badit")
    randomize_adapters(model, scale=0.5)  # a trained, non-uniform router
    ids, mask = left_padded_batch(LENGTHS)
    before = model(ids, mask)
    plant_signal(model)
    d = regroup(model)
    assert d["moved"] == 0 and d["per_layer"]["moved"] == [0, 0, 0]
    assert all(p == list(range(32)) for p in d["permutations"].values())
    assert torch.equal(model(ids, mask), before)


def test_a_changed_partition_moves_only_the_components_that_changed(tiny_checkpoints):
    model = adapted(tiny_checkpoints["llama3"], "badit")
    randomize_adapters(model, scale=0.5)
    plant_signal(model, swap=(1, 6))  # component 1 belongs with expert 1, component 6 with expert 0
    d = regroup(model)
    assert d["per_layer"]["moved"] == [2, 2, 2] and d["moved"] == 6 and d["moved_mean"] == 2
    swapped = list(range(32))
    swapped[1], swapped[6] = 6, 1  # each takes the other's slot; every router row keeps its components
    assert all(p == swapped for p in d["permutations"].values())


def test_lora_is_six_experts_without_a_router(tiny_checkpoints):
    """METHOD.md section 6: every method scales each component by alpha / r, so a rank-24 LoRA with the same
    A and B computes what six rank-4 experts compute under uniform routing."""
    path = tiny_checkpoints["llama3"]
    lora, moe = adapted(path, "lora"), adapted(path, "loramoe")
    randomize_adapters(lora, scale=0.1)
    for name, a in adapters_of(lora).items():
        b = adapters_of(moe)[name]
        assert a.scaling == b.scaling == 32 / 4
        with torch.no_grad():
            b.A.copy_(a.A)
            b.B.copy_(a.B)
    ids, mask = left_padded_batch(LENGTHS)
    torch.testing.assert_close(lora(ids, mask), moe(ids, mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["badit", "badit-noregroup", "badit-nobad", "lora", "cgc"])
def test_top_k_is_for_loramoe_only(tiny_checkpoints, method):
    with pytest.raises(ValueError, match="--top-k is for loramoe only"):
        adapted(tiny_checkpoints["llama3"], method, top_k=2)


def test_top_k_within_the_experts(tiny_checkpoints):
    for k in (0, 9):
        with pytest.raises(ValueError, match=f"--top-k {k} must be between 1 and --num-experts"):
            adapted(tiny_checkpoints["llama3"], "loramoe", top_k=k)
    adapted(tiny_checkpoints["llama3"], "loramoe", top_k=2)


def test_regroup_moves_adamw_state_with_the_components(tiny_checkpoints):
    """Regroup after a step, then step: equals stepping a model that started in the permuted order."""
    path = tiny_checkpoints["llama3"]
    first = adapted(path, "badit")
    for a in routed_adapters(first).values():
        a.G.requires_grad_(False)  # uniform routing: the order of components is then irrelevant
    second = copy.deepcopy(first)
    opt = torch.optim.AdamW([p for p in first.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    train_steps(first, [1], opt)
    perms = regroup(first, opt)["permutations"]
    train_steps(first, [2], opt)

    for name, a in routed_adapters(second).items():
        perm = torch.tensor(perms[name])
        with torch.no_grad():
            a.A.copy_(a.A[perm])
            a.B.copy_(a.B[:, perm])
    opt2 = torch.optim.AdamW([p for p in second.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    train_steps(second, [1, 2], opt2, accumulate=False)
    for name, a in routed_adapters(first).items():
        b = routed_adapters(second)[name]
        torch.testing.assert_close(a.A, b.A, atol=1e-6, rtol=0)
        torch.testing.assert_close(a.B, b.B, atol=1e-6, rtol=0)


def test_regroup_signals(tiny_checkpoints):
    """'accumulated' clusters the sum of gradients since the last regroup, 'last' the last one."""
    path = tiny_checkpoints["llama3"]
    model = adapted(path, "badit")
    train_steps(model, [1])
    g1 = {n: a.signal_sum.clone() for n, a in routed_adapters(model).items()}
    train_steps(model, [2])
    for n, a in routed_adapters(model).items():
        torch.testing.assert_close(a.signal_sum, g1[n] + a.signal_last)
    last, accumulated = copy.deepcopy(model), copy.deepcopy(model)
    only_last = copy.deepcopy(model)
    for a in routed_adapters(only_last).values():
        a.signal_sum.copy_(a.signal_last)
    p_last = regroup(last, signal="last")["permutations"]
    assert p_last == regroup(only_last)["permutations"]
    assert p_last != regroup(accumulated)["permutations"]
    assert all((a.signal_sum == 0).all() for a in routed_adapters(last).values())  # restarts after a regroup


# ---------------------------------------------------------------------------------------------- save, load, merge


@pytest.mark.parametrize("method", METHODS)
def test_save_and_load_restore_exactly(tiny_checkpoints, tmp_path, method):
    path = tiny_checkpoints["qwen2"]
    model = adapted(path, method)
    randomize_adapters(model)
    save_adapters(model, tmp_path)
    restored = load_model(path, device="cpu", dtype=torch.float32)
    load_adapters(restored, tmp_path)
    ids, mask = left_padded_batch(LENGTHS)
    task_ids = TASKS if method == "cgc" else None
    assert torch.equal(model(ids, mask, task_ids=task_ids), restored(ids, mask, task_ids=task_ids))
    assert restored.adapter_config == model.adapter_config


def test_cgc_merges_per_task(tiny_checkpoints):
    path = tiny_checkpoints["qwen2"]
    model = adapted(path, "cgc")
    randomize_adapters(model, scale=0.3)
    ids, mask = left_padded_batch(LENGTHS)
    outputs = model(ids, mask, task_ids=torch.tensor([2, 2, 2]))
    merged = merge_adapters(copy.deepcopy(model), task_id=2)
    assert not adapters_of(merged)
    torch.testing.assert_close(merged(ids, mask), outputs, atol=1e-5, rtol=0)
    other = model(ids, mask, task_ids=torch.tensor([0, 0, 0]))
    assert not torch.allclose(other, outputs, atol=1e-3)  # the task id matters


# ---------------------------------------------------------------------------------------------- PEFT parity


def peft_model(path, r):
    """PEFT scales by lora_alpha / r; our s = alpha / (expert rank) = 32 / 4 for every method (METHOD.md
    section 6), so the same function has lora_alpha = s x r."""
    from peft import LoraConfig, get_peft_model

    from conftest import hf_model

    return get_peft_model(hf_model(path), LoraConfig(r=r, lora_alpha=32 / 4 * r, lora_dropout=0.0, target_modules=["gate_proj"]))


def hf_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)).logits


def test_lora_matches_peft(tiny_checkpoints):
    path = tiny_checkpoints["llama3"]
    ours = adapted(path, "lora", num_experts=6, rank=4)
    randomize_adapters(ours, scale=0.1)
    ref = peft_model(path, r=24)
    sd = ref.state_dict()
    for name, a in adapters_of(ours).items():
        sd[f"base_model.model.model.{name}.lora_A.default.weight"].copy_(a.A)
        sd[f"base_model.model.model.{name}.lora_B.default.weight"].copy_(a.B)
    ids, mask = left_padded_batch(LENGTHS)
    real = mask.bool()
    torch.testing.assert_close(ours(ids, mask)[real], hf_logits(ref, ids, mask)[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["lora", "pissa", "o-lora"])
def test_peft_export_loads_in_peft(tiny_checkpoints, tmp_path, method):
    from peft import PeftModel

    from conftest import hf_model
    from continual import set_task

    path = tiny_checkpoints["llama3"]
    ours = adapted(path, method, **({"num_tasks": 3} if method == "o-lora" else {}))
    randomize_adapters(ours, scale=0.1)
    if method == "o-lora":  # after two tasks of three: the third branch is off and not exported
        set_task(ours, 1)
    export_peft(ours, tmp_path)
    ref = PeftModel.from_pretrained(hf_model(path), tmp_path).eval()  # on the original, unmodified weights
    ids, mask = left_padded_batch(LENGTHS)
    real = mask.bool()
    torch.testing.assert_close(ours(ids, mask)[real], hf_logits(ref, ids, mask)[real], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_input(tiny_checkpoints):
    path = tiny_checkpoints["llama3"]
    with pytest.raises(ValueError, match=r"--targets gatee_proj matches no linear layer.*gate_proj"):
        adapted(path, "lora", targets=("gatee_proj",))
    with pytest.raises(ValueError, match=r"--targets foo_proj matches no linear layer"):  # one target in two is no better
        adapted(path, "lora", targets=("gate_proj", "foo_proj"))
    with pytest.raises(ValueError, match="72 SVD components .* exceed min\\(out, in\\) = 64"):
        adapted(path, "badit", num_experts=6, rank=12)
    with pytest.raises(ValueError, match="unknown method 'bdit'; choose one of lora, pissa"):
        adapted(path, "bdit")
    with pytest.raises(ValueError, match="cgc needs num_tasks"):
        add_adapters(load_model(path, device="cpu", dtype=torch.float32), "cgc")
    model = adapted(path, "cgc")
    ids, mask = left_padded_batch(LENGTHS)
    with pytest.raises(ValueError, match="cgc adapters need a task id per sequence"):
        model(ids, mask)
    with pytest.raises(ValueError, match="badit gates depend on each input"):
        merge_adapters(adapted(path, "badit"))
    with pytest.raises(ValueError, match="no gradient signal yet"):
        regroup(adapted(path, "badit"))


def test_expert_angles_of_known_directions():
    """Hand-made directions: orthogonal experts are 90 degrees apart, equal components 0 within an expert, two
    components 60 degrees apart give an intra-expert angle of 60; rank 1 has no pairs within (90 by convention)."""
    e = torch.eye(4)
    Z = torch.stack([e[0], e[0], e[1], e[1]])[None]  # 2 experts of rank 2: equal within, orthogonal between
    intra, inter = expert_angles(Z, 2)
    torch.testing.assert_close(intra, torch.tensor([0.0]), atol=1e-3, rtol=0)
    torch.testing.assert_close(inter, torch.tensor([90.0]), atol=1e-4, rtol=0)
    c, s = 0.5, 3 ** 0.5 / 2  # cos 60, sin 60
    Z = torch.stack([e[0], c * e[0] + s * e[1], e[2], c * e[2] + s * e[3]])[None]
    intra, inter = expert_angles(Z, 2)
    torch.testing.assert_close(intra, torch.tensor([60.0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(inter, torch.tensor([90.0]), atol=1e-4, rtol=0)
    Z = torch.stack([e[0], e[0], e[0], e[0]])[None]  # two experts pointing the same way
    torch.testing.assert_close(expert_angles(Z, 2)[1], torch.tensor([0.0]), atol=1e-3, rtol=0)
    torch.testing.assert_close(expert_angles(Z, 1)[0], torch.tensor([90.0]))


def test_badit_nobad_is_loramoe_with_badits_regroup(tiny_checkpoints):
    """The paper's "w/o BAD" (badit-nobad): loramoe's experts (same seed: the same A, B = 0, W untouched), and
    DOG regroups them."""
    path = tiny_checkpoints["llama3"]
    torch.manual_seed(0)
    nobad = adapted(path, "badit-nobad")
    torch.manual_seed(0)
    moe = adapted(path, "loramoe")
    W = load_model(path, device="cpu", dtype=torch.float32).layers[0].mlp.gate_proj.weight
    for name, a in routed_adapters(nobad).items():
        b = routed_adapters(moe)[name]
        assert torch.equal(a.A, b.A) and a.A.abs().sum() > 0 and torch.equal(a.B, torch.zeros_like(a.B))
        assert not hasattr(a, "A0")  # no SVD, no residual
    assert torch.equal(adapters_of(nobad)["layers.0.mlp.gate_proj"].base.weight, W)
    train_steps(nobad, [1, 2])
    assert regroup(nobad)["moved"] > 0


def test_gradient_angles_follow_the_gradients_and_restart(tiny_checkpoints):
    """The --angles-every diagnostic: the angles of the summed gradients, equal to expert_angles on them by hand,
    every routed method; the sum restarts after each reading and follows a regroup's permutation."""
    model = adapted(tiny_checkpoints["llama3"], "loramoe")
    ids, mask = left_padded_batch(LENGTHS)
    sums = {}
    for seed in (1, 2):
        randomize_adapters(model, seed=seed, scale=0.05)
        loss_of(model, ids, mask).backward()
        accumulate_angle_signal(model)
        for name, a in routed_adapters(model).items():
            z = torch.cat([a.A.grad, a.B.grad.T], 1)
            sums[name] = sums.get(name, 0) + z
        model.zero_grad()
    got = gradient_angles(model)
    assert got["per_layer"]["layer"] == list(routed_adapters(model))
    for i, name in enumerate(got["per_layer"]["layer"]):
        intra, inter = expert_angles(torch.nn.functional.normalize(sums[name], dim=-1)[None], 4)
        assert got["per_layer"]["intra"][i] == pytest.approx(intra.item(), abs=1e-4)
        assert got["per_layer"]["inter"][i] == pytest.approx(inter.item(), abs=1e-4)
    assert got["intra"] == pytest.approx(sum(got["per_layer"]["intra"]) / 3)
    assert all((a.angle_sum == 0).all() for a in routed_adapters(model).values())

    badit = adapted(tiny_checkpoints["llama3"], "badit")  # a regroup permutes the diagnostic's sum with A and B
    loss_of(badit, ids, mask).backward()
    accumulate_regroup_signal(badit)
    accumulate_angle_signal(badit)
    before = {n: a.angle_sum.clone() for n, a in routed_adapters(badit).items()}
    perms = regroup(badit)["permutations"]
    for name, a in routed_adapters(badit).items():
        assert torch.equal(a.angle_sum, before[name][torch.tensor(perms[name])])


# ---------------------------------------------------------------------------------------------- the router by hand


def routed_by_hand(a, x, prompt, top_k=None):
    """METHOD.md (4.1)-(4.2) written out for one routed layer: the gate from the mean of x over each sequence's
    prompt positions, K softmax, (optionally the k largest kept and renormalised), each expert's r components."""
    K, r, s = a.num_experts, a.rank, a.scaling
    out = []
    for b in range(x.shape[0]):
        xbar = x[b][prompt[b].bool()].mean(0)  # (n,) over this sequence's prompt only
        g = torch.softmax(a.G @ xbar, dim=0)  # (K,)
        if top_k is not None:
            keep = torch.zeros(K)
            keep[g.topk(top_k).indices] = 1
            g = g * keep / (g * keep).sum()
        c = torch.cat([K * g[e].repeat(r) for e in range(K)])  # (N,)
        delta = sum(s * c[j] * torch.outer(a.B[:, j], a.A[j]) for j in range(a.A.shape[0]))  # (m, n)
        out.append(x[b] @ (a.base.weight + delta).T + (a.base.bias if a.base.bias is not None else 0))
    return torch.stack(out)


@pytest.mark.parametrize("method,top_k", [("badit", None), ("loramoe", None), ("loramoe", 2)])
def test_the_routed_forward_equals_the_formula_with_a_trained_router(tiny_checkpoints, method, top_k):
    model = adapted(tiny_checkpoints["llama3"], method, **({"top_k": top_k} if top_k else {}))
    randomize_adapters(model, seed=3, scale=0.2)  # non-zero router weights: the gates differ per sequence
    name, a = next(iter(routed_adapters(model).items()))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, a.A.shape[1], generator=g)
    prompt = torch.tensor([[1, 1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1]])  # answers, padding: 0
    model.routing.begin(prompt, None, None)
    with torch.no_grad():
        got = a(x)
        gates = model.routing.kept[0].gate
    assert not torch.allclose(gates[0], gates[1])  # really routed: the sequences' gates differ
    if top_k:
        assert ((gates.view(3, a.num_experts, a.rank)[:, :, 0] > 0).sum(1) == top_k).all()
    hand = routed_by_hand(copy.deepcopy(a).double(), x.double(), prompt, top_k)  # float64: what is left is the model's error
    torch.testing.assert_close(got.double(), hand, atol=1e-5 * hand.abs().max().item(), rtol=1e-4)
    x[0, 5:] += 100.0  # the answer's positions of sequence 0 move the output there, never its gate
    model.routing.begin(prompt, None, None)
    with torch.no_grad():
        a(x)
    torch.testing.assert_close(model.routing.kept[0].gate, gates)
