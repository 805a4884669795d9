"""The regroup's cost: DOG (METHOD.md section 5) against its k-means start alone, and BADIT's training time
against LoRAMoE's (the paper: 1.22x; the target here: under 1.05x on the demo model).

Part 1 times, at two shapes, on gradient-like signals (each layer's N = 32 components noisy mixtures of
K = 8 hidden directions with a shared one and random norms, as at a regroup):
    the k-means alone (badit.spherical_kmeans, n_init 10, max_iter 100),
    DOG (badit.dynamic_orthogonal_grouping: the k-means, exact balanced assignments, orthogonal targets,
    iterated until the groups stop changing, at most 20 rounds), and the whole badit.regroup of a model
    with those signals (DOG, matching to the experts, the permutation of A, B and AdamW state).
Part 2 (--train) trains loramoe and badit with train.py's classroom recipe on the demo model (K = 8, the
same seed, no evaluation) and compares their wall times; badit regroups twice (after epochs 1 and 2 of 4).

    python bench/bench_regroup.py [--device cuda] [--train]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from badit import dynamic_orthogonal_grouping, spherical_kmeans  # noqa: E402

K, R = 8, 4
SHAPES = {"SmolLM2-135M (30 x 32 x 2112)": (30, K * R, 576 + 1536), "Qwen3-8B (36 x 32 x 16384)": (36, K * R, 4096 + 12288)}


def gradient_like(L, N, D, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    directions = F.normalize(torch.randn(L, K + 1, D, generator=g), dim=-1)
    mix = torch.rand(L, N, K + 1, generator=g) ** 4  # a few dominant directions per component
    mix[..., -1] = 0.5  # shared by every component: the gradients are correlated
    noise = torch.randn(L, N, D, generator=g) / D**0.5
    return F.normalize((mix @ directions + 0.5 * noise) * torch.rand(L, N, 1, generator=g), dim=-1).to(device)


def seconds(fn, device, repeat=3) -> float:
    """The best of `repeat` timed calls, after one untimed warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def part_one(device):
    for name, (L, N, D) in SHAPES.items():
        Z = gradient_like(L, N, D, device)
        kmeans = seconds(lambda: spherical_kmeans(Z, K, 10, 100, 0), device)
        dog = seconds(lambda: dynamic_orthogonal_grouping(Z, R, 10, 100, 0), device)
        _, _, d = dynamic_orthogonal_grouping(Z, R, 10, 100, 0)
        print(f"{name}: k-means {kmeans * 1e3:7.1f} ms | DOG {dog * 1e3:7.1f} ms ({dog / kmeans:.2f}x the k-means; "
              f"rounds per layer {d['rounds'].float().mean():.1f}, at most {int(d['rounds'].max())}) | "
              f"J after k-means {d['J_kmeans'].mean():.3f} -> after DOG {d['J_end'].mean():.3f}")


def part_two(device: str):
    with tempfile.TemporaryDirectory(prefix="bench_regroup.") as work:
        times = {}
        for method in ("loramoe", "badit"):
            start = time.perf_counter()
            subprocess.run([sys.executable, "train.py", "--method", method, "--eval", "none", "--device", device,
                            "--out", str(Path(work) / method)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            times[method] = time.perf_counter() - start
            log = [json.loads(line) for line in (Path(work) / method / "log.jsonl").read_text().splitlines()]
            regroups = sum("regroup" in e for e in log)
            print(f"{method:8s} {times[method]:6.1f} s ({sum('loss' in e for e in log)} steps, {regroups} regroups)")
        print(f"badit / loramoe training time {times['badit'] / times['loramoe']:.3f} (target < 1.05; the paper 1.22)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--train", action="store_true", help="also part 2: badit against loramoe through train.py")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    part_one(torch.device(args.device))
    if args.train:
        part_two(args.device)


if __name__ == "__main__":
    main()
