"""Regroup clustering: our batched spherical k-means against the authors' code's approach
(METHOD.md section 9).

The authors' code clusters each layer on its own with scikit-learn KMeans(n_clusters=K, n_init=10,
max_iter=100) on the normalised gradient vectors. Ours clusters all layers in one batch
(badit.spherical_kmeans, same n_init and max_iter). Both are scored by the spherical objective:
the mean cosine of each vector to its own cluster's unit centroid.

The vectors are gradient-like: each layer's 24 components are noisy mixtures of 6 hidden
directions, with a shared direction and random norms, as clustered at a regroup.

    python bench/bench_kmeans.py
"""

import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from badit import spherical_kmeans  # noqa: E402

SHAPES = {"SmolLM2-135M (30 x 24 x 2112)": (30, 24, 576 + 1536), "Qwen3-8B (36 x 24 x 16384)": (36, 24, 4096 + 12288)}
K = 6


def gradient_like(L, N, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    directions = F.normalize(torch.randn(L, K + 1, D, generator=g), dim=-1)
    mix = torch.rand(L, N, K + 1, generator=g) ** 4  # a few dominant directions per component
    mix[..., -1] = 0.5  # shared by every component: the gradients are correlated
    noise = torch.randn(L, N, D, generator=g) / D**0.5
    return (mix @ directions + 0.5 * noise) * torch.rand(L, N, 1, generator=g)


def objective(z, labels):  # z (N, D) unit, labels (N,) -> mean cos to own normalised centroid
    c = F.normalize(torch.zeros(K, z.shape[1]).index_add(0, labels, z), dim=-1)
    return (z * c[labels]).sum(-1).mean().item()


def main():
    from sklearn.cluster import KMeans

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, (L, N, D) in SHAPES.items():
        x = gradient_like(L, N, D)
        spherical_kmeans(x[:2], K)  # warm-up
        start = time.perf_counter()
        labels, _ = spherical_kmeans(x, K, n_init=10, max_iter=100, seed=0)
        ours_s = time.perf_counter() - start

        start = time.perf_counter()
        ref_labels = []
        for layer in x:  # the reference: one layer at a time, on the CPU, in numpy
            z = F.normalize(layer, dim=-1).numpy().astype(np.float32)
            ref_labels.append(KMeans(n_clusters=K, n_init=10, max_iter=100, random_state=0).fit(z).labels_)
        ref_s = time.perf_counter() - start

        z = F.normalize(x, dim=-1)
        ours_obj = np.mean([objective(z[l], labels[l]) for l in range(L)])
        ref_obj = np.mean([objective(z[l], torch.as_tensor(ref_labels[l]).long()) for l in range(L)])
        print(f"{name}: ours {ours_s * 1e3:8.1f} ms  sklearn {ref_s * 1e3:8.1f} ms  speed-up {ref_s / ours_s:6.1f}x "
              f"(target >= 50x) | objective ours {ours_obj:.4f}  sklearn {ref_obj:.4f}  "
              f"{'equal or better' if ours_obj >= ref_obj - 1e-6 else 'WORSE'}")


if __name__ == "__main__":
    main()
