"""Evaluation (METHOD.md section 8): greedy generation, ROUGE-L and exact match, tables across runs,
the continual-learning metrics, and the paper's analyses.

    python eval.py evaluate RUN_DIR            # base model + the run's adapter on the run's test sets
    python eval.py evaluate --base-only --model PATH --data ROOT
    python eval.py generate RUN_DIR --prompt TEXT [--task NAME]  # the adapter on prompts of your own
    python eval.py export RUN_DIR --peft DIR | --merged DIR      # for PEFT, transformers and serving tools
    python eval.py compare RUN_DIR ... [--single SINGLE_RUN ...]  # per-task ROUGE-L side by side, colla
    python eval.py continual RUN_DIR [--single SINGLE_RUN]        # AP / Fgt / Fwt / Bwt from the score matrix
    python eval.py angles RUN_DIR              # regroup angles over training, from log.jsonl
    python eval.py angles RUN... --out DIR     # the paper's Figure 4 from runs made with --angles-every
    python eval.py conflict RUN_DIR            # task-gradient cosine matrix of the adapter
    python eval.py coactivation RUN_DIR        # how many tasks share each weight block's top gradients

Every command writes Markdown (and CSV for the analyses) beside its input and prints it; PNG plots
are added when matplotlib is installed. `evaluate` writes files of its own (metrics_eval_<split>_<n>.*)
and replaces a run's record (metrics_test.json, which compare, continual and study.py read) only with
--replace. colla and Fwt take the single-task runs of the same method and tasks, and refuse others.
"""

import argparse
import csv
import io
import json
import string
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import elrea
import files
from adapter_files import export_peft, load_adapters, merge_adapters
from badit import REGROUP_STATS, adapters_of
from checks import ROUTED, InputError, MissingFile, command, names, number, positive_int
from data import (CLASSROOM, SUPERNI, Example, answer_loss, collate, encode_examples, format_prompt, list_tasks,
                  load_tasks, read_task)
from files import (METRICS, RUN_CONFIG, atomic_write, check_apart, check_record, kind_of, new_folder, read_json, read_jsonl,
                   read_record, write_json, write_signed)
from hf import DEMO_MODEL, load_model, load_tokenizer, read_model_args, save_model
from model import generate

ROOT = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------------
# Metrics


_scorer = None


def rouge_l(prediction: str, references: list[str]) -> float:
    """rouge-score's rougeL F-measure with stemming, the maximum over the references, x100."""
    global _scorer
    if _scorer is None:
        from rouge_score import rouge_scorer

        _scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return 100 * max(_scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references)


def normalize_answer(s: str) -> str:
    """SuperNI's normalisation for exact match: lower case, no punctuation, single spaces."""
    return " ".join("".join(ch for ch in s.lower() if ch not in string.punctuation).split())


def exact_match(prediction: str, references: list[str]) -> float:
    return 100.0 * any(normalize_answer(prediction) == normalize_answer(r) for r in references)


def score(predictions: list[dict]) -> dict:
    """predictions: [{task, prediction, references}] -> per-task and average ROUGE-L and exact match."""
    per_task = {}
    for p in predictions:
        t = per_task.setdefault(p["task"], {"rougeL": 0.0, "exact_match": 0.0, "n": 0})
        t["rougeL"] += rouge_l(p["prediction"], p["references"])
        t["exact_match"] += exact_match(p["prediction"], p["references"])
        t["n"] += 1
    for t in per_task.values():
        t["rougeL"] /= t["n"]
        t["exact_match"] /= t["n"]
    mean = lambda key: sum(t[key] for t in per_task.values()) / max(len(per_task), 1)  # noqa: E731
    return {"per_task": per_task, "rougeL": mean("rougeL"), "exact_match": mean("exact_match")}


def colla(rouge: float, single: dict) -> float:
    """METHOD.md section 8: multi-task ROUGE-L minus the mean of the single-task models' per-task ROUGE-L."""
    return rouge - sum(single.values()) / len(single)


def continual_metrics(a, single=None) -> dict:
    """a[j][i]: score on task i (training order) after training the j-th task (METHOD.md section 8, 9.9).

    AP = mean_i a[T][i]; Fgt = mean_{i<T} max_{j in [i, T-1]} a[j][i] - a[T][i];
    Bwt = mean_{i<T} a[T][i] - a[i][i]; Fwt = mean_i a[i][i] - mean_i b_i (needs the single-task scores b).
    Indices are 1-based in METHOD.md section 8.4; here the last row is a[-1]. A partial matrix (a run still under way:
    fewer rows than tasks) has no AP yet and is refused.
    """
    T = len(a)
    if T == 0 or any(len(row) != T for row in a):
        raise InputError(f"continual metrics need the full T x T score matrix; this one has {T} row(s) of "
                         f"{len(a[0]) if a else 0} task(s): finish the run first (train.py --out RUN --resume).")
    out = {"AP": sum(a[-1]) / T}
    if T > 1:
        out["Fgt"] = sum(max(a[j][i] for j in range(i, T - 1)) - a[-1][i] for i in range(T - 1)) / (T - 1)
        out["Bwt"] = sum(a[-1][i] - a[i][i] for i in range(T - 1)) / (T - 1)
    if single is not None:
        out["Fwt"] = sum(a[i][i] for i in range(T)) / T - sum(single) / T
    return out


# ----------------------------------------------------------------------------------------------
# Generation


@torch.no_grad()
def predict(model, tok, examples, batch_size=64, max_new_tokens=50, use_task_ids=False, weights=None,
            desc="generating", sampling=None) -> list[dict]:
    """Batched greedy generation (longest prompts first; collate pads on the right, generate right-aligns the
    prompts for the cache) -> [{task, id, prompt, references, prediction}]. sampling: generate()'s temperature,
    top_p and generator, for a sampled rather than greedy completion.

    weights (n, M): ELREA's ensemble (the model holds a methods.Ensemble of M LoRAs). Each batch then runs
    as M x B rows, member-major, row a B + b under member a, and every step picks the token of the
    weighted sum of a query's M rows of logits (elrea.mixer); the weights go into the predictions."""
    was_training = model.training
    model.eval()
    device = model.lm_head.weight.device
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].prompt_ids))
    members = 1 if weights is None else weights.shape[1]
    out = [None] * len(examples)
    for s in tqdm(range(0, len(order), max(1, batch_size // members)), desc=desc, unit="batch", leave=False):
        rows = order[s:s + max(1, batch_size // members)]
        chunk = [examples[i] for i in rows]
        batch = collate(chunk, tok.pad_token_id, device)
        ids, mask, task_ids, mix = batch["ids"], batch["mask"], batch["task_ids"] if use_task_ids else None, None
        if weights is not None:
            ids, mask = ids.repeat(members, 1), mask.repeat(members, 1)
            task_ids = torch.arange(members, device=device).repeat_interleave(len(chunk))  # each row's member
            mix = elrea.mixer(weights[rows])
        generated = generate(model, ids, mask, max_new_tokens, tok.stop_token_ids, tok.pad_token_id, task_ids=task_ids,
                             mix=mix, **(sampling or {}))[:len(chunk), batch["ids"].shape[1]:]
        for i, e, row in zip(rows, chunk, generated.tolist()):
            stops = [k for k, t in enumerate(row) if t in tok.stop_token_ids]
            row = row[:stops[0]] if stops else row  # what follows the first EOS is padding
            out[i] = {"task": e.task, "id": e.id, "prompt": tok.decode(e.prompt_ids, skip_special_tokens=False),
                      "references": e.references, "prediction": tok.decode(row).strip()}
            if weights is not None:
                out[i]["weights"] = {"base": weights[i, 0].item(), **{f"c{k}": w.item() for k, w in enumerate(weights[i, 1:])}}
    model.train(was_training)
    return out


def evaluate(model, tok, examples, out_dir=None, name="metrics", **kw) -> dict:
    """predict + score; with out_dir, writes <name>.json, <name>.md and <name>_predictions.jsonl."""
    predictions = predict(model, tok, examples, **kw)
    metrics = score(predictions)
    metrics["task_ids_used"] = bool(kw.get("use_task_ids"))
    metrics["max_new_tokens"] = kw.get("max_new_tokens", 50)  # with per_task's n: what a comparison must match
    if out_dir is not None:  # each file whole or not at all; the record (.json, which says "done") last
        out = Path(out_dir)
        atomic_write(out / f"{name}_predictions.jsonl",
                     lambda f: Path(f).write_text("".join(json.dumps(p) + "\n" for p in predictions)))
        atomic_write(out / f"{name}.md", lambda f: Path(f).write_text(markdown_table({name: metrics})))
        write_json(out / f"{name}.json", metrics)
    return metrics


def markdown_table(runs: dict, note="") -> str:
    """runs: name -> metrics (score()'s dict) -> per-task ROUGE-L (exact match) side by side."""
    tasks = list(dict.fromkeys(t for m in runs.values() for t in m["per_task"]))
    cell = lambda m, t: f"{m['per_task'][t]['rougeL']:.1f} ({m['per_task'][t]['exact_match']:.0f})" if t in m["per_task"] else "-"  # noqa: E731
    names = [n + (" [task id]" if m.get("task_ids_used") else "") for n, m in runs.items()]
    lines = ["| task | " + " | ".join(names) + " |", "|---" * (len(runs) + 1) + "|"]
    lines += [f"| {t} | " + " | ".join(cell(m, t) for m in runs.values()) + " |" for t in tasks]
    lines.append("| **average** | " + " | ".join(f"**{m['rougeL']:.1f}** ({m['exact_match']:.0f})" for m in runs.values()) + " |")
    if any("colla" in m for m in runs.values()):
        lines.append("| colla | " + " | ".join(f"{m['colla']:+.1f}" if "colla" in m else "-" for m in runs.values()) + " |")
    lines.append("\nROUGE-L x100 (exact match %)." + (" [task id]: CGC-LoRA is given each test example's task id "
                                                       "(an oracle advantage)." if any(m.get("task_ids_used") for m in runs.values()) else "") + note)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Loading a run


def read_config(run_dir) -> dict:
    """A run's config.json, checked (RUN_CONFIG): a model folder, or a damaged record, is named as such."""
    file = Path(run_dir) / "config.json"
    if not file.is_file():
        raise MissingFile(f"{file} is missing: pass a run directory written by train.py.")
    cfg = read_json(file, "the run's configuration is damaged")
    if isinstance(cfg, dict) and "model_type" in cfg and "method" not in cfg:
        raise InputError(f"{run_dir} is a model checkpoint, not a run directory: pass a run written by train.py "
                         f"(a model goes with --model).")
    return check_record(cfg, RUN_CONFIG, file, "the run's configuration is damaged: restore it from a copy")


def load_run(run_dir=None, model_path=None, device=None, dtype=None, adapter=True):
    """(model, tokenizer, adapter config or None): the base model plus the run's final adapter, in eval mode and
    in the precision the run was trained in unless dtype says otherwise."""
    cfg = read_config(run_dir) if run_dir else {}
    path = model_path or cfg.get("model") or DEMO_MODEL
    model = load_model(path, device=device, dtype=dtype or cfg.get("dtype"))
    config = load_adapters(model, run_dir) if run_dir and adapter else None
    return model.eval(), load_tokenizer(path), config  # the adapters came in training mode: no dropout at inference


def test_examples(tok, data, tasks, split="test", limit=None, max_len=1024, max_answer_len=50, all_tasks=None):
    tasks = load_tasks(data, tasks, split, limit)
    return encode_examples(tok, tasks, all_tasks or [t.name for t in tasks], max_len, max_answer_len, train=False)


# ----------------------------------------------------------------------------------------------
# Analyses (METHOD.md section 8)


def task_batches(tok, data, tasks, batches, batch_size, max_len, device, seed=0):
    """task -> `batches` training batches of that task (labelled, seeded answer choice)."""
    out = {}
    for task in load_tasks(data, tasks, "train", batches * batch_size):
        ex = encode_examples(tok, [task], tasks, max_len, train=True, seed=seed)
        out[task.name] = [collate(ex[s:s + batch_size], tok.pad_token_id, device) for s in range(0, len(ex), batch_size)]
    return out


def task_gradients(model, per_task_batches, params, use_task_ids=False) -> dict:
    """task -> list of mean gradients (one per parameter in params) over that task's batches."""
    out = {}
    for task, batches in tqdm(per_task_batches.items(), desc="task gradients", unit="task"):
        grads = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        for batch in batches:
            loss = answer_loss(model, batch, use_task_ids) / batch["answer"].sum()  # mean over answer tokens
            g = torch.autograd.grad(loss, params)
            for acc, x in zip(grads, g):
                acc += x.float() / len(batches)
        out[task] = grads
    return out


def conflict_matrix(grads: dict):
    """T x T cosine between the tasks' flattened mean gradients, mean off-diagonal, share of negative pairs."""
    tasks = list(grads)
    G = F.normalize(torch.stack([torch.cat([g.flatten() for g in grads[t]]) for t in tasks]), dim=1)
    C = G @ G.T
    off = C[~torch.eye(len(tasks), dtype=torch.bool)]
    return tasks, C, off.mean().item(), (off < 0).float().mean().item()


def coactivation_histogram(grads: dict, block=32, top=0.10):
    """Per task: squared gradient of each weight, 32x32 average-pooled, the top 10 % blocks of each weight
    matrix marked (METHOD.md section 8: per matrix, so that layers with larger gradients do not take every
    mark); returns counts[c] = number of blocks marked by exactly c tasks (c = 0..T)."""
    T = len(grads)
    marks = 0
    for g in grads.values():
        mark = []
        for w in g:
            m = F.avg_pool2d(w.float().pow(2)[None, None], block, ceil_mode=True).flatten()
            mark.append(torch.zeros_like(m, dtype=torch.long).scatter(0, m.topk(max(1, int(top * m.numel()))).indices, 1))
        marks = marks + torch.cat(mark)
    return torch.bincount(marks, minlength=T + 1).tolist()


def write_outputs(out_base: Path, markdown: str, rows: list[list], draw=None, panels: int = 1):
    """<out_base>.md and .csv, and .png when matplotlib is installed."""
    out_base.with_suffix(".md").write_text(markdown)
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    out_base.with_suffix(".csv").write_text(buf.getvalue())
    png = maybe_plot(out_base, draw, panels) if draw else None
    print(markdown)
    print(f"wrote {out_base.with_suffix('.md')} and .csv" + (" and .png" if png else ""))


def maybe_plot(out_base: Path, draw, panels: int = 1, grid: tuple | None = None, size: tuple | None = None) -> Path | None:
    """out_base.png drawn by draw(ax) (or draw(axes): `panels` side by side, or a (rows, cols) grid), when matplotlib
    is installed -> its path, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows, cols = grid or (1, panels)
    fig, ax = plt.subplots(rows, cols, figsize=size or (6 * cols, 4 * rows), squeeze=grid is None, layout="constrained")
    draw(ax)
    fig.savefig(out_base.with_suffix(".png"), dpi=120)
    plt.close(fig)
    return out_base.with_suffix(".png")


# ----------------------------------------------------------------------------------------------
# Commands


def cmd_evaluate(args):
    if not args.run_dir and not args.base_only:
        raise InputError("eval.py evaluate: give a RUN_DIR, or --base-only --model PATH.")
    cfg = read_config(args.run_dir) if args.run_dir else {}
    out = evaluation_folder(args)
    path = args.model or cfg.get("model") or DEMO_MODEL
    data = args.data or cfg.get("data", CLASSROOM)
    tasks = args.tasks or cfg.get("tasks") or list_tasks(data)
    examples = test_examples(load_tokenizer(path), data, tasks, args.split, args.limit,  # the data before the model
                             args.max_len or cfg.get("max_len", 1024), cfg.get("max_answer_len", 50),
                             all_tasks=task_numbering(args.run_dir, cfg) if args.run_dir else None)
    ensemble = cfg.get("method") == "elrea" and not args.base_only
    model, tok, adapter = load_run(None if args.base_only else args.run_dir, path, args.device, args.dtype, adapter=not ensemble)
    use_ids = bool(adapter) and adapter["method"] == "cgc"
    weights = elrea.prepare_ensemble(model, args.run_dir, examples, tok.pad_token_id) if ensemble else None
    name = ("metrics_base" if args.base_only else f"metrics_{args.split}" if args.replace
            else f"metrics_eval_{args.split}_{args.limit or 'all'}")
    metrics = evaluate(model, tok, examples, out, name, batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens, use_task_ids=use_ids, weights=weights)
    print(markdown_table({"base" if args.base_only else cfg.get("method", "run"): metrics}))
    print(f"wrote {out / name}.json, .md and _predictions.jsonl")


def evaluation_folder(args) -> Path:
    """Where `evaluate` writes: the run directory itself (its own files, never another command's records unless
    --replace), or an --out folder that eval.py made or that is new or empty, never another run."""
    if args.replace and (args.base_only or args.out):
        raise InputError("--replace rewrites the run's own record (metrics_<split>.json in RUN_DIR): it takes neither "
                         "--base-only nor --out.")
    if args.out is None and args.run_dir:
        return Path(args.run_dir)
    out = Path(args.out or ROOT / "runs" / f"base-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.run_dir and out.resolve() == Path(args.run_dir).resolve():
        return out
    if kind_of(out) == "run" or (out / "config.json").is_file() and (out / "log.jsonl").is_file():
        raise InputError(f"--out {out} holds another run: its scores would be mixed with {args.run_dir or 'the base model'}'s. "
                         f"Leave --out out to write into the evaluated run, or choose a new folder.")
    check_apart({"--out": out}, {"RUN_DIR": args.run_dir, "--model": args.model, "--data": args.data})
    return new_folder(out, "evaluation", "eval.py", "--out", of=args.run_dir or f"base {args.model}")


def task_numbering(run_dir, cfg: dict) -> list[str]:
    """The task list whose order numbers the adapter's task ids (cgc's gates): the run's, which a single-task
    run's per-task folder shares with its parent (recorded as task_ids; runs made before read the parent's)."""
    if cfg.get("task_ids"):
        return cfg["task_ids"]
    parent = Path(run_dir).resolve().parent / "config.json"
    if cfg.get("setting") == "single" and len(cfg.get("tasks", [])) == 1 and parent.is_file():
        return read_json(parent).get("tasks", cfg["tasks"])
    return cfg.get("tasks")


def read_prompts(args) -> list[str]:
    """--prompt TEXT, or a JSONL --file (one object per line: its "prompt", or its "input" for --task's
    definition), or standard input, one per line."""
    if args.prompt is not None:
        return [args.prompt]
    if args.file:
        file = Path(args.file)
        if not file.is_file():
            raise MissingFile(f"--file {file} does not exist: give a JSONL file, one {{\"prompt\": ...}} per line.")
        prompts = []
        for i, line in enumerate(utf8(file.read_bytes(), f"--file {file}").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{file}: line {i} is not JSON ({e.msg}); one object per line.") from None
            text = record.get("prompt", record.get("input")) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise InputError(f"{file}: line {i} needs a string field \"prompt\" (or \"input\", with --task).")
            prompts.append(text)
        return prompts
    if sys.stdin is None or sys.stdin.closed:
        raise InputError("no prompt: standard input is closed; give --prompt TEXT or --file F.jsonl.")
    if sys.stdin.isatty():  # never wait silently
        print("reading prompts from the terminal, one per line; end with Ctrl-D (or give --prompt TEXT / --file F.jsonl)",
              file=sys.stderr)
    return [line for line in utf8(sys.stdin.buffer.read(), "standard input").splitlines() if line.strip()]


def utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{what} is not UTF-8 text (byte {e.start} is {data[e.start:e.start + 1]!r}): save the prompts "
                         f"as UTF-8.") from None


def cmd_generate(args):
    """Completions of the run's model and adapter for prompts of your own (greedy unless --temperature)."""
    cfg = read_config(args.run_dir)
    tasks = task_numbering(args.run_dir, cfg)
    if args.task is not None and args.task not in cfg["tasks"]:
        raise InputError(f"--task {args.task!r} is not one of this run's tasks: {', '.join(cfg['tasks'])}.")
    if cfg["method"] == "cgc" and args.task is None:
        raise InputError(f"cgc's gate depends on the task: give --task, one of {', '.join(cfg['tasks'])}.")
    tok = load_tokenizer(cfg["model"])
    texts = read_prompts(args)
    if not texts:
        raise InputError("no prompt: give --prompt TEXT, --file F.jsonl, or prompts on standard input, one per line.")
    definition = read_task(cfg["data"], args.task, "train").definition if args.task else None
    prompts = [format_prompt(definition, t) if definition is not None else t for t in texts]
    task_id = tasks.index(args.task) if args.task else 0
    examples = [Example(args.task or "", task_id, str(i), tok.encode(p), []) for i, p in enumerate(prompts)]
    longest, limit = max(len(e.prompt_ids) for e in examples), read_model_args(cfg["model"]).max_positions
    if limit and longest + args.max_new_tokens > limit:
        raise InputError(f"a prompt of {longest} tokens and {args.max_new_tokens} new ones exceed the model's "
                         f"max_position_embeddings ({limit}); shorten it or lower --max-new-tokens.")
    ensemble = cfg["method"] == "elrea"
    model, tok, _ = load_run(args.run_dir, None, args.device, args.dtype, adapter=not ensemble)
    weights = elrea.prepare_ensemble(model, args.run_dir, examples, tok.pad_token_id) if ensemble else None
    generator = torch.Generator(model.lm_head.weight.device).manual_seed(args.seed)
    sampling = dict(temperature=args.temperature, top_p=args.top_p, generator=generator)
    for out in predict(model, tok, examples, args.batch_size, args.max_new_tokens, cfg["method"] == "cgc", weights,
                       sampling=sampling):
        if args.verbose:
            print(f"--- prompt {int(out['id']) + 1}:\n{prompts[int(out['id'])]}")
            if "weights" in out:
                print("elrea weights: " + ", ".join(f"{k} {v:.3f}" for k, v in out["weights"].items()))
            print("--- completion:")
        print(out["prediction"])


def cmd_export(args):
    """--peft DIR: the adapter in PEFT's format (lora, pissa, o-lora); --merged DIR: a Hugging Face checkpoint with
    the adapter folded into the weights (lora, pissa, o-lora, and cgc for one --task)."""
    cfg = read_config(args.run_dir)
    method = cfg["method"]
    if method in ROUTED + ("elrea", "gainlora"):
        how = ("it weighs its LoRAs per query" if method == "elrea" else "its gates weigh the task branches by each prompt"
               if method == "gainlora" else "its router weighs the experts by each prompt")
        raise InputError(f"a {method} adapter cannot be exported as one static weight: {how}. Use it through "
                         f"`python eval.py generate {args.run_dir} --prompt TEXT`, or in Python with "
                         f"eval.load_run('{args.run_dir}') and model.generate.")
    if args.peft and method not in ("lora", "pissa", "o-lora"):
        raise InputError(f"--peft covers lora, pissa and o-lora; a {method} adapter has no PEFT equivalent (cgc: --merged "
                         f"with --task).")
    if args.task is not None and method != "cgc":
        raise InputError(f"--task is for cgc's per-task gate; a {method} adapter has none.")
    if method == "cgc" and args.merged and args.task not in cfg["tasks"]:
        raise InputError(f"merging a cgc adapter takes one task's gate: give --task, one of {', '.join(cfg['tasks'])}.")
    if not (args.peft or args.merged):
        raise InputError("give --peft DIR or --merged DIR.")
    if args.peft and args.merged and (files.inside(args.peft, args.merged) or files.inside(args.merged, args.peft)):
        raise InputError(f"--peft {args.peft} and --merged {args.merged} overlap: a PEFT adapter and a merged model are "
                         f"two outputs; give them two separate folders.")
    check_apart({"--peft": args.peft, "--merged": args.merged}, {"RUN_DIR": args.run_dir, "the run's --model": cfg["model"]})
    folders = {flag: new_folder(d, kind, "eval.py export", flag, of=args.run_dir) for flag, d, kind in
               (("--peft", args.peft, "peft export"), ("--merged", args.merged, "merged model")) if d}
    model, _, _ = load_run(args.run_dir, None, args.device, args.dtype or "float32")
    if "--peft" in folders:
        export_peft(model, folders["--peft"], str(cfg["model"]))
        print(f"wrote {folders['--peft']}: a PEFT LoRA for {cfg['model']} (peft.PeftModel.from_pretrained)")
    if "--merged" in folders:
        merge_adapters(model, task_numbering(args.run_dir, cfg).index(args.task) if method == "cgc" else None)
        save_model(model, folders["--merged"], cfg["model"])
        print(f"wrote {folders['--merged']}: a Hugging Face checkpoint with the adapter merged "
              f"(transformers.AutoModelForCausalLM.from_pretrained)")


def run_metrics(run_dir) -> dict:
    file = Path(run_dir) / "metrics_test.json"
    if not file.is_file():
        raise MissingFile(f"{run_dir} has no metrics_test.json: run `python eval.py evaluate {run_dir} --replace` first.")
    return read_record(file, METRICS, "the run's record is damaged; evaluate it again with `eval.py evaluate RUN --replace`")


def single_runs(paths) -> dict:
    """method -> (folder, config) of --single runs, which must be single-task runs, one per method."""
    out = {}
    for path in paths or []:
        cfg = read_config(path)
        if cfg.get("setting") != "single":
            raise InputError(f"--single {path} is a --setting {cfg.get('setting')} run; give a --setting single run.")
        if cfg["method"] in out:
            raise InputError(f"--single gives two {cfg['method']} runs ({out[cfg['method']][0]}, {path}); give one per method.")
        out[cfg["method"]] = (path, cfg)
    return out


def matching_single(run, cfg: dict, singles: dict, tasks: list[str]):
    """The --single run of the same method and tasks as `run` (METHOD.md section 8: colla and Fwt compare a method with
    its own single-task runs), or an InputError that says which differs."""
    if cfg["method"] not in singles:
        given = ", ".join(f"{m} ({p})" for m, (p, _) in singles.items())
        raise InputError(f"{run} is a {cfg['method']} run, and --single gives single-task runs of {given}: colla and Fwt "
                         f"compare a method with its own single-task runs; add a {cfg['method']} --setting single run.")
    path, _ = singles[cfg["method"]]
    per_task = run_metrics(path)["per_task"]
    missing, extra = sorted(set(tasks) - set(per_task)), sorted(set(per_task) - set(tasks))
    if missing or extra:
        raise InputError(f"--single {path} was not trained on {run}'s tasks: "
                         + "; ".join(x for x in (missing and f"it lacks {', '.join(missing)}",
                                                 extra and f"it has {', '.join(extra)} besides") if x)
                         + ". Give a single-task run of the same tasks.")
    return per_task


def evaluated_with(metrics: dict) -> tuple:
    """What a score depends on besides the model: the decoding length and the examples per task (None: not recorded)."""
    return metrics.get("max_new_tokens"), {t: v.get("n") for t, v in metrics["per_task"].items()}


def describe_settings(settings: tuple) -> str:
    tokens, counts = settings
    n = sorted({c for c in counts.values() if c is not None})
    return (f"max_new_tokens {tokens if tokens is not None else 'not recorded'}, "
            f"{'/'.join(map(str, n)) if n else 'unrecorded numbers of'} examples per task")


def cmd_compare(args):
    singles, runs, task_sets = single_runs(args.single), {}, {}
    for run in args.run_dirs:
        cfg, m = read_config(run), dict(run_metrics(run))
        name = f"{Path(run).name} ({cfg.get('method', '?')})"
        if singles and cfg.get("setting") == "mtl":
            single = matching_single(run, cfg, singles, list(m["per_task"]))
            m["colla"] = colla(m["rougeL"], {t: single[t]["rougeL"] for t in m["per_task"]})
        runs[name], task_sets[name] = m, set(m["per_task"])
    first = task_sets[next(iter(task_sets))]
    other = [n for n, t in task_sets.items() if t != first]
    note = " colla = average minus the mean single-task ROUGE-L of the same method's --single run." if singles else ""
    if other:  # an average over other tasks is not comparable: say so in the row and below
        runs = {(n + " [other tasks]" if n in other else n): m for n, m in runs.items()}
        note += " [other tasks]: this run's average is over another task set than the first run's (" + "; ".join(
            f"{n}: {len(task_sets[n])} tasks, {len(task_sets[n] & first)} shared" for n in other) + ")."
    settings = {n: evaluated_with(m) for n, m in runs.items()}
    first_settings = settings[next(iter(settings))]
    differ = [n for n, (tokens, counts) in settings.items() if tokens != first_settings[0]
              or any(counts[t] != first_settings[1][t] for t in set(counts) & set(first_settings[1]))]
    if differ:  # rows decoded shorter, or on fewer examples, are not comparable either
        runs = {(n + " [other settings]" if n in differ else n): m for n, m in runs.items()}
        note += " [other settings]: evaluated with other settings than the first run (" + "; ".join(
            f"{n}: {describe_settings(settings[n])}" for n in differ) + f"; the first: {describe_settings(first_settings)})."
    text = markdown_table(runs, note)
    if args.out:
        write_signed(args.out, text, "eval.py compare")
    print(text)


def cmd_continual(args):
    cfg = read_config(args.run_dir)
    if cfg.get("setting") != "continual":
        raise InputError(f"{args.run_dir} is a --setting {cfg.get('setting')} run; give a --setting continual run.")
    file = Path(args.run_dir) / "continual.json"
    if not file.is_file():
        raise MissingFile(f"{file} is missing: the run has not scored its first task yet.")
    c = read_json(file, "the run's record is damaged")
    order, a = c["order"], c["rougeL"]
    single = None
    if args.single:
        per_task = matching_single(args.run_dir, cfg, single_runs([args.single]), order)
        single = [per_task[t]["rougeL"] for t in order]
    m = continual_metrics(a, single)
    lines = ["| after \\ on | " + " | ".join(order) + " |", "|---" * (len(order) + 1) + "|"]
    lines += [f"| {i + 1}. {order[i]} | " + " | ".join(f"{x:.1f}" for x in row) + " |" for i, row in enumerate(a)]
    lines.append("\n" + ", ".join(f"{k} {v:.2f}" for k, v in m.items()) + " (ROUGE-L x100; METHOD.md section 8)")
    text = "\n".join(lines) + "\n"
    atomic_write(Path(args.run_dir) / "continual.md", lambda f: Path(f).write_text(text))
    write_json(Path(args.run_dir) / "continual_metrics.json", m)
    print(text)


# The paper's Figure 4, as its text describes it (no numbers are printed beside the figure): BADIT's inter-expert
# gradient angle stays near 90 degrees over training, its intra-expert angle is about 60 degrees, about 20 below
# LoRAMoE's. The dotted lines of `eval.py angles`' figure.
PAPER_ANGLES = {"inter": [(90.0, "BADIT (paper): about 90")], "intra": [(60.0, "BADIT (paper): about 60"),
                                                                        (80.0, "LoRAMoE (paper): about 20 more")]}


def cmd_angles(args):
    """The experts' gradient angles over training (METHOD.md section 5 at every regroup; --angles-every along the run).

    One run: its regroup diagnostics as today (angles.md / .csv / .png, angles_layers.*) and, if it was run with
    --angles-every, figure4.md / .csv / .png beside them. Several runs (--out DIR): figure4.* in DIR, one line per
    run, labelled with its method (and seed, order), the paper's reported levels dotted."""
    runs = [Path(r) for r in args.run_dirs]
    if len(runs) > 1 and not args.out:
        raise InputError("eval.py angles with several runs writes one figure for them all: give --out DIR (a new folder).")
    logs = {}
    for run in runs:
        log = run / "log.jsonl"
        if not log.is_file():
            raise MissingFile(f"{log} is missing: pass a run directory written by train.py.")
        logs[run] = read_jsonl(log)
    if len(runs) == 1:
        regroups = [e for e in logs[runs[0]] if "regroup" in e]
        if regroups:
            regroup_angles(runs[0], regroups)
    series = {run: [e for e in lines if "angles" in e] for run, lines in logs.items()}
    if not any(series.values()):
        if len(runs) == 1 and any("regroup" in e for e in logs[runs[0]]):
            return
        raise InputError(f"{', '.join(str(r / 'log.jsonl') for r in runs)}: no angle entries (train.py --angles-every N "
                         "logs them, for loramoe, badit-noregroup, badit and badit-nobad) and no regroup entries.")
    missing = [str(r) for r, e in series.items() if not e]
    if missing:
        raise InputError(f"{', '.join(missing)}: no angle entries; rerun with train.py --angles-every N, or leave "
                         f"{'it' if len(missing) == 1 else 'them'} out.")
    out = new_folder(args.out, "angles", "eval.py angles", "--out") if args.out else runs[0]
    labels = {run: run_label(read_config(run), run) for run in runs}
    rows = [["run", "phase", "step", "intra", "inter"]]
    rows += [[labels[r], e["phase"], e["step"], e["angles"]["intra"], e["angles"]["inter"]] for r in runs for e in series[r]]

    def draw(axes):
        for ax, key in zip(axes, ("inter", "intra")):
            for run in runs:
                steps = global_steps(series[run])
                ax.plot(steps, [e["angles"][key] for e in series[run]], label=labels[run])
            for level, text in PAPER_ANGLES[key]:
                ax.axhline(level, color="gray", linestyle=":", linewidth=1)
                ax.annotate(text, (0.01, level), xycoords=("axes fraction", "data"), fontsize=7, color="gray",
                            va="bottom")
            ax.set(xlabel="optimizer step", ylabel="degrees (mean over layers)", title=f"{key}-expert gradient angle")
        axes[0].legend(fontsize=7)

    note = ("\nAngles in degrees between the experts' gradient directions summed over each --angles-every window, means "
            "over the adapted layers (METHOD.md section 5's definitions): intra = within an expert, inter = between the experts' "
            "mean directions. The paper (Figure 4): BADIT's inter-expert angle stays near 90, its intra-expert angle is "
            "about 60, about 20 below LoRAMoE's.")
    write_outputs(out / "figure4", table(rows, note), rows, draw, panels=2)


def run_label(cfg: dict, run: Path) -> str:
    """A run's name in a figure: its method, and its seed and order."""
    order = f" o{cfg['order']}" if cfg.get("setting") == "continual" else ""
    return f"{cfg.get('method', run.name)}{order} s{cfg.get('seed', 0)}"


def global_steps(entries: list[dict]) -> list[int]:
    """Steps counted over the phases of a continual run (each phase restarts at step 1), in log order."""
    offset, last, out = 0, {}, []
    for e in entries:
        last[e["phase"]] = e["step"]
        offset = sum(v for p, v in last.items() if p < e["phase"])
        out.append(offset + e["step"])
    return out


def regroup_angles(run: Path, entries: list[dict]):
    """The regroup diagnostics of METHOD.md section 5 over training: angles.md / .csv / .png, the means over layers
    at every regroup; angles_layers.md / .csv / .png, every layer at every regroup (runs logged before DOG
    have angles, moves and their own objective only: the columns they lack are left out)."""
    keys = [k for k in REGROUP_STATS if all(k in e["regroup"] for e in entries)]
    rows = [["phase", "epoch", "step"] + keys] + [[e["phase"], e["epoch"], e["step"]] + [e["regroup"][k] for k in keys]
                                                  for e in entries]
    note = ("Angles in degrees between the components' gradient directions; J = sum over experts of the squared norm "
            "of the sum of their unit directions, at the start (the experts as they were), after k-means and after "
            "DOG's rounds (METHOD.md section 5).")
    angles = ["intra_before", "intra_after", "inter_before", "inter_after"]

    def draw(ax):
        for k in angles:
            ax.plot([e["step"] for e in entries], [e["regroup"][k] for e in entries], marker="o", label=k)
        ax.set(xlabel="optimizer step", ylabel="degrees (mean over layers)")
        ax.legend()

    write_outputs(run / "angles", table(rows, "\n" + note + " Means over layers."), rows, draw)
    per_layer = [e for e in entries if "per_layer" in e]
    if not per_layer:
        return
    layer_keys = [k for k in keys if k in per_layer[0]["per_layer"]]
    rows = [["phase", "step", "layer"] + layer_keys]
    rows += [[e["phase"], e["step"], name] + [e["per_layer"][k][i] for k in layer_keys]
             for e in per_layer for i, name in enumerate(e["per_layer"]["layer"])]

    def draw_layers(ax):
        for e in per_layer:
            for k, style in (("intra_after", "-o"), ("inter_after", "--s")):
                ax.plot(e["per_layer"][k], style, markersize=3, label=f"step {e['step']}: {k}")
        ax.set(xlabel="adapted layer (in model order)", ylabel="degrees")
        ax.legend(fontsize=6)

    write_outputs(run / "angles_layers", table(rows, "\n" + note + " One row per layer and regroup."), rows,
                  draw_layers)


def table(rows: list[list], note: str) -> str:
    """A Markdown table of rows (the first is the header), floats to three decimals, then the note."""
    md = ["| " + " | ".join(map(str, rows[0])) + " |", "|---" * len(rows[0]) + "|"]
    md += ["| " + " | ".join(f"{x:.3f}" if isinstance(x, float) else str(x) for x in r) + " |" for r in rows[1:]]
    return "\n".join(md + [note]) + "\n"


def analysis_setup(args):
    cfg = read_config(args.run_dir)
    model, tok, adapter = load_run(args.run_dir, None, args.device, args.dtype)
    tasks = cfg["tasks"]
    batches = task_batches(tok, cfg["data"], tasks, args.batches, args.batch_size, cfg["max_len"],
                           model.lm_head.weight.device, cfg["seed"])
    model.eval()  # no dropout: the gradients are a property of the weights
    return cfg, model, batches, adapter["method"] == "cgc"


def cmd_conflict(args):
    cfg, model, batches, use_ids = analysis_setup(args)
    params = [p for p in model.parameters() if p.requires_grad]
    tasks, C, mean_off, negative = conflict_matrix(task_gradients(model, batches, params, use_ids))
    C = C.cpu()  # T x T, for the table and the plot
    rows = [[""] + tasks] + [[t] + [round(x, 4) for x in C[i].tolist()] for i, t in enumerate(tasks)]
    md = ["| | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    md += [f"| {t} | " + " | ".join(f"{x:+.2f}" for x in C[i].tolist()) + " |" for i, t in enumerate(tasks)]
    md.append(f"\nCosine between the tasks' mean adapter gradients ({args.batches} batches of {args.batch_size} per task). "
              f"Mean off-diagonal {mean_off:+.3f}; negative pairs {100 * negative:.0f} %.")
    write_outputs(Path(args.run_dir) / "conflict", "\n".join(md) + "\n", rows,
                  lambda ax: (ax.imshow(C, cmap="RdBu", vmin=-1, vmax=1), ax.set_xticks(range(len(tasks)), tasks, rotation=90),
                              ax.set_yticks(range(len(tasks)), tasks)))


def cmd_coactivation(args):
    cfg, model, batches, use_ids = analysis_setup(args)
    weights = [a.base.weight for a in adapters_of(model).values()]
    for w in weights:
        w.requires_grad_(True)
    counts = coactivation_histogram(task_gradients(model, batches, weights, use_ids))
    rows = [["tasks marking a block", "blocks"]] + [[c, n] for c, n in enumerate(counts)]
    total = sum(counts[1:])
    md = ["| tasks | blocks | share of marked blocks |", "|---|---|---|"]
    md += [f"| {c} | {n} | {100 * n / max(total, 1):.1f} % |" if c else f"| 0 | {n} | - |" for c, n in enumerate(counts)]
    md.append(f"\nPer task: squared gradient of each adapted weight ({', '.join(cfg['targets'])}), 32x32 average-pooled, "
              "top 10 % blocks marked; how many tasks mark each block (METHOD.md section 8).")
    write_outputs(Path(args.run_dir) / "coactivation", "\n".join(md) + "\n", rows,
                  lambda ax: (ax.bar(range(1, len(counts)), counts[1:]), ax.set(xlabel="tasks marking the block", ylabel="blocks")))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("evaluate", help="generate on a split and score it (ROUGE-L, exact match)")
    e.add_argument("run_dir", nargs="?", help="a run directory written by train.py (its config gives model and data)")
    e.add_argument("--base-only", action="store_true", help="evaluate the base model without any adapter")
    e.add_argument("--model", help="checkpoint folder or hub id (default: the run's, or the demo model)")
    e.add_argument("--data", help=f"a SuperNI-layout folder, '{SUPERNI}' or '{CLASSROOM}' (default: the run's)")
    e.add_argument("--tasks", type=names, help="comma-separated task names (default: the run's, or all)")
    e.add_argument("--split", default="test", choices=["train", "dev", "test"])
    e.add_argument("--limit", type=positive_int, help="first N instances per task")
    e.add_argument("--max-len", type=number(int, 16), help="maximum prompt + answer tokens (default: the run's)")
    e.add_argument("--max-new-tokens", type=positive_int, default=50, help="greedy decoding length (METHOD.md section 8.1: 50)")
    e.add_argument("--batch-size", type=positive_int, default=64, help="prompts per generation batch (default: %(default)s)")
    e.add_argument("--out", help="output folder, new or made by eval.py, never another run (default: the run "
                   "directory; with --base-only runs/base-<time>)")
    e.add_argument("--replace", action="store_true", help="write the run's own record, metrics_<split>.json, which "
                   "compare, continual and study.py read (default: metrics_eval_<split>_<limit or all>.json beside it)")

    c = sub.add_parser("compare", help="per-task ROUGE-L of several runs side by side, with colla")
    c.add_argument("run_dirs", nargs="+")
    c.add_argument("--single", nargs="+", help="--setting single runs, one per method: each mtl run's colla is against "
                   "the single-task run of its own method and tasks")
    c.add_argument("--out", help="also write the Markdown table here")

    ct = sub.add_parser("continual", help="AP / Fgt / Fwt / Bwt of a --setting continual run")
    ct.add_argument("run_dir")
    ct.add_argument("--single", help="a --setting single run of the same method and tasks, for Fwt")

    g = sub.add_parser("generate", help="completions of the run's model and adapter for prompts of your own")
    g.add_argument("run_dir", help="a run directory (or a single-task run's <task> folder)")
    g.add_argument("--prompt", help="the prompt (with --task: the input of that task's prompt (METHOD.md section 7)); default: "
                   "--file, or standard input, one prompt per line")
    g.add_argument("--file", help="a JSONL file, one {\"prompt\": ...} (or {\"input\": ...} with --task) per line")
    g.add_argument("--task", help="one of the run's tasks: prompts become its prompt's input (METHOD.md section 7) (cgc needs it: its "
                   "gate depends on the task)")
    g.add_argument("--max-new-tokens", type=positive_int, default=50)
    g.add_argument("--temperature", type=number(float, 0), default=0.0, help="0: greedy (default); above 0: sampled")
    g.add_argument("--top-p", type=number(float, 0, 1, low_open=True), default=1.0, help="nucleus sampling: draw "
                   "from the most likely tokens that reach this probability (default: 1, all)")
    g.add_argument("--seed", type=number(int, 0), default=0, help="the sampling's seed (default: 0)")
    g.add_argument("--batch-size", type=positive_int, default=64, help="prompts per generation batch")
    g.add_argument("--verbose", action="store_true", help="print each prompt too, and elrea's per-query weights")

    x = sub.add_parser("export", help="the adapter for other tools: PEFT format, or merged into a checkpoint")
    x.add_argument("run_dir")
    x.add_argument("--peft", metavar="DIR", help="a PEFT LoRA folder (lora, pissa)")
    x.add_argument("--merged", metavar="DIR", help="a Hugging Face checkpoint folder with the adapter folded into the "
                   "weights (lora, pissa; cgc with --task), for transformers and the tools that serve models")
    x.add_argument("--task", help="cgc: the task whose gate is merged")

    a = sub.add_parser("angles", help="the experts' gradient angles over training (from log.jsonl): regroup "
                       "diagnostics, and the paper's Figure 4 from runs made with --angles-every")
    a.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    a.add_argument("--out", help="with several runs: the folder for figure4.md / .csv / .png (new, or written by "
                   "eval.py angles before)")
    for name, text in (("conflict", "task-gradient cosine matrix"), ("coactivation", "co-activation histogram")):
        s = sub.add_parser(name, help=text + " of a run's adapted model")
        s.add_argument("run_dir")
        s.add_argument("--batches", type=positive_int, default=4, help="training batches per task")
        s.add_argument("--batch-size", type=positive_int, default=4)
    for s in (e, g, x, sub.choices["conflict"], sub.choices["coactivation"]):
        s.add_argument("--device", help="cpu or cuda (default: cuda when available)")
        s.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: the run's (bfloat16 where the "
                       "device has native bf16, else float32)")
    args = p.parse_args(argv)
    {"evaluate": cmd_evaluate, "generate": cmd_generate, "export": cmd_export, "compare": cmd_compare,
     "continual": cmd_continual, "angles": cmd_angles, "conflict": cmd_conflict,
     "coactivation": cmd_coactivation}[args.command](args)


if __name__ == "__main__":
    command(main)
