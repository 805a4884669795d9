"""SuperNI data (METHOD.md section 7): reading tasks, the prompt, tokenising with label masks, batching,
and the embedded classroom suite.

A task lives in <root>/<task>/{train,dev,test}.json in the natural-instructions format:
`Definition` (list of strings) and `Instances` (list of {id, input, output}, output a list of
acceptable answers). `--data classroom` (the default everywhere) is a small suite generated here,
deterministically, in the same format: `python data.py --export DIR` writes it to disk.

    python data.py --download superni  # the benchmark's 15 tasks into the cache that --data superni reads
    python data.py --export DIR        # the classroom suite in SuperNI layout
    python data.py --show ROOT         # tasks, split sizes and one prompt per task
"""

import argparse
import hashlib
import http.client
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from checks import InputError, MissingFile, command
from files import check_writable_path, kind_of, mark, new_folder, write_json

# METHOD.md section 7, exactly; note the trailing space after "Output:".
PROMPT = "{definition}\n\nNow complete the following example -\nInput: {input}\nOutput: "
SPLITS = ("train", "dev", "test")
CLASSROOM = "classroom"
SUPERNI = "superni"  # --data superni: the benchmark's 15 tasks in the cache (download_superni puts them there)


def format_prompt(definition: str, input: str) -> str:
    return PROMPT.format(definition=definition, input=input)


# ----------------------------------------------------------------------------------------------
# The benchmark, one command away (METHOD.md section 7): the 15 task folders of the SAPT repository at a pinned
# commit, each file checked against the sha256 manifest committed beside this file.

SUPERNI_URL = ("https://raw.githubusercontent.com/circle-hit/SAPT/52a52b920324c656bdb6dac08e43dc600ba22f21/"
               "CL_Benchmark/SuperNI")
MANIFEST = Path(__file__).resolve().parent / "superni.sha256"


def superni_cache() -> Path:
    """Where --data superni lives: $BADIT_CACHE/superni, by default ~/.cache/badit/superni."""
    return Path(os.environ.get("BADIT_CACHE") or Path.home() / ".cache" / "badit") / SUPERNI


def manifest(file=MANIFEST) -> dict[str, str]:
    """task/split.json -> sha256, from a `sha256sum` listing."""
    return {name: digest for digest, name in (line.split() for line in Path(file).read_text().splitlines() if line.strip())}


def sha256(file) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


SUPERNI_PAGE = "https://github.com/circle-hit/SAPT/tree/52a52b920324c656bdb6dac08e43dc600ba22f21/CL_Benchmark/SuperNI"


def by_hand(dest: Path) -> str:
    again = "" if dest == superni_cache() else f" {dest}"
    return (f"To place the files by hand: copy the 15 task folders of {SUPERNI_PAGE} (a clone of the SAPT repository "
            f"at that commit will do) into {dest}, as {dest}/<task>/{{train,dev,test}}.json, and run `python data.py "
            f"--download superni{again}` again: it checks every file against {MANIFEST.name} and fetches none that "
            f"is already right.")


def download_superni(dest=None, url=SUPERNI_URL, files=None) -> Path:
    """Fetch the benchmark's files into dest (default: the cache), each written to a temporary file beside its
    place, checked against its sha256 and only then renamed into place; files already there and right are not
    fetched again. files: name -> sha256 (default: the committed manifest). -> dest."""
    import urllib.error
    import urllib.request
    from tqdm import tqdm

    dest = Path(dest) if dest else superni_cache()
    files = files or manifest()
    todo = [name for name, digest in files.items() if not ((dest / name).is_file() and sha256(dest / name) == digest)]
    foreign = [name for name in todo if (dest / name).exists()]
    if foreign and kind_of(dest) != "superni download":  # a file of yours by a benchmark file's name: never replaced
        raise InputError(f"{dest / foreign[0]} is not the benchmark's file (its sha256 differs from {MANIFEST.name}) "
                         f"and {dest} was not made by this command: nothing was replaced. Move the file away, or "
                         f"download into another folder.")
    check_writable_path(dest, "--download")
    mark(dest, "superni download", "data.py --download")
    for name in tqdm(todo, desc=f"SuperNI into {dest}", unit="file"):
        target, source = dest / name, f"{url}/{name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".part")
        try:
            with urllib.request.urlopen(source, timeout=60) as response, open(tmp, "wb") as out:
                shutil.copyfileobj(response, out)
                expected = int(response.headers.get("Content-Length") or out.tell())
                if out.tell() < expected:  # the server went away in the middle of the file
                    raise http.client.IncompleteRead(b"", expected - out.tell())
            if sha256(tmp) != files[name]:
                raise InputError(f"{source} does not match its sha256 in {MANIFEST.name} (the file was changed or cut "
                                 f"short on the way); nothing of it was kept. Try again later. {by_hand(dest)}")
            os.replace(tmp, target)
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise InputError(f"could not download {source} ({getattr(e, 'reason', None) or e}): offline, or the server "
                             f"refused it; nothing of it was kept in {dest}. {by_hand(dest)}") from None
        finally:
            tmp.unlink(missing_ok=True)
    print(f"{len(files)} SuperNI files in {dest} match {MANIFEST.name} ({len(todo)} downloaded); use --data {SUPERNI}")
    return dest


def data_root(root):
    """The folder --data names: `superni` is the cache (refused, with the download command, while incomplete)."""
    if str(root) != SUPERNI:
        return root
    cache = superni_cache()
    missing = [name for name in manifest() if not (cache / name).is_file()]
    if missing:
        raise MissingFile(f"--data {SUPERNI} is the benchmark in {cache}, which lacks {len(missing)} of its "
                          f"{len(manifest())} files (e.g. {missing[0]}): run `python data.py --download superni` "
                          f"(BADIT_CACHE moves the cache), or pass --data with a folder of your own.")
    return cache


# ----------------------------------------------------------------------------------------------
# Reading tasks


@dataclass
class Task:
    name: str
    definition: str
    instances: list  # [{id, input, output: [str, ...]}]
    source: str  # the file, for error messages


def list_tasks(root) -> list[str]:
    """Task names (sorted) of a SuperNI root, or of the classroom suite."""
    if str(root) == CLASSROOM:
        return list(CLASSROOM_TASKS)
    root = Path(data_root(root))
    if root.exists() and not root.is_dir():
        raise InputError(f"data root {root} is a file: pass --data with a folder holding <task>/train.json etc. "
                         f"(SuperNI layout), or --data {CLASSROOM} for the embedded suite.")
    if not root.is_dir():
        raise MissingFile(f"data root {root} does not exist: pass --data with a folder holding <task>/train.json "
                                f"etc. (SuperNI layout), or --data {CLASSROOM} for the embedded suite.")
    tasks = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not tasks:
        raise MissingFile(f"data root {root} has no task folders (expected <root>/<task>/train.json, dev.json, test.json).")
    return tasks


def read_task(root, task: str, split: str) -> Task:
    """One task's split, checked field by field."""
    if str(root) == CLASSROOM:
        return classroom_task(task, split)
    root = data_root(root)
    file = Path(root) / task / f"{split}.json"
    if not (Path(root) / task).is_dir():
        raise MissingFile(f"task {task!r} not found in {root}; available: {', '.join(list_tasks(root))}.")
    if not file.is_file():
        raise MissingFile(f"{file} is missing: every task folder needs {', '.join(s + '.json' for s in SPLITS)}.")
    try:
        data = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"{file}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); save the file "
                         f"as UTF-8.") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{file}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}).") from None
    if not isinstance(data, dict):
        raise InputError(f"{file}: expected a JSON object with 'Definition' and 'Instances'.")
    for key in ("Definition", "Instances"):
        if key not in data:
            raise InputError(f"{file}: field '{key}' is missing (natural-instructions format).")
        if not isinstance(data[key], list):
            raise InputError(f"{file}: field '{key}' must be a list.")
    if not all(isinstance(d, str) for d in data["Definition"]):
        raise InputError(f"{file}: field 'Definition' must be a list of strings.")
    if not data["Instances"]:
        raise InputError(f"{file}: field 'Instances' is empty; the task has no {split} examples.")
    for i, inst in enumerate(data["Instances"]):
        if not isinstance(inst, dict):
            raise InputError(f"{file}: Instances[{i}] must be an object with 'input' and 'output'.")
        for key in ("input", "output"):
            if key not in inst:
                raise InputError(f"{file}: Instances[{i}] has no field '{key}'.")
        if not isinstance(inst["input"], str):
            raise InputError(f"{file}: Instances[{i}].input must be a string, not {type(inst['input']).__name__}.")
        outputs = inst["output"] if isinstance(inst["output"], list) else [inst["output"]]
        if not outputs or not all(isinstance(o, str) for o in outputs):
            raise InputError(f"{file}: Instances[{i}].output must be a non-empty list of strings.")
        inst["output"] = outputs
        inst.setdefault("id", f"{task}-{split}-{i}")
    return Task(task, " ".join(data["Definition"]), data["Instances"], str(file))


def load_tasks(root, tasks=None, split="train", limit=None) -> list[Task]:
    """The chosen tasks (default: all of the root), the first `limit` instances of each."""
    names = list(tasks) if tasks else list_tasks(root)
    out = []
    for name in names:
        task = read_task(root, name, split)
        task.instances = task.instances[:limit] if limit else task.instances
        out.append(task)
    return out


# ----------------------------------------------------------------------------------------------
# Tokenising: prompt, answer + EOS, label mask, truncation of the input only


@dataclass
class Example:
    task: str
    task_id: int
    id: str
    prompt_ids: list  # token ids of the prompt (the router's positions)
    answer_ids: list  # answer + EOS (the loss's positions); empty for evaluation
    references: list = field(default_factory=list)  # every acceptable output

    def __len__(self):
        return len(self.prompt_ids) + len(self.answer_ids)


def encode_prompt(tok, task: Task, input: str, budget: int) -> list[int]:
    """Token ids of the prompt (METHOD.md section 7) in at most `budget` tokens, shortening the end of the input only."""
    ids = tok.encode(format_prompt(task.definition, input))
    if len(ids) <= budget:
        return ids
    bare = len(tok.encode(format_prompt(task.definition, "")))
    if bare > budget:
        raise InputError(f"{task.source}: the 'Definition' and the prompt template take {bare} tokens, more than the "
                         f"{budget} left of the maximum length after the answer; raise --max-len (the definition "
                         f"is never cut).")
    ends = [end for _, end in tok.offsets(input)]  # character end of each input token
    keep = len(ends)
    while len(ids) > budget:  # cutting at a token boundary may merge tokens differently: re-check
        keep = max(0, keep - (len(ids) - budget))
        ids = tok.encode(format_prompt(task.definition, input[:ends[keep - 1]] if keep else ""))
    return ids


def encode_examples(tok, tasks: list[Task], task_names: list[str], max_len=1024, max_answer_len=50,
                    train=True, seed=0) -> list[Example]:
    """Training examples (prompt + one answer + EOS, the answer drawn with a seeded generator) or
    evaluation examples (prompt only, every output kept as a reference). task_names fixes task ids."""
    out = []
    for task in tasks:
        for inst in task.instances:
            answer = []
            if train:
                choice = random.Random(f"{seed}:{task.name}:{inst['id']}").choice(inst["output"])
                answer = tok.encode(choice, add_special_tokens=False)[:max_answer_len] + [tok.eos_token_id]
            budget = max_len - (len(answer) if train else max_answer_len)
            prompt = encode_prompt(tok, task, inst["input"], budget)
            out.append(Example(task.name, task_names.index(task.name), str(inst["id"]), prompt, answer, inst["output"]))
    return out


def fingerprint(examples: list[Example]) -> dict:
    """Per task: how many examples, and the sha256 of their ids, tokens and references: a run records it,
    so that --resume can refuse data that changed and name where."""
    out = {}
    for e in examples:
        n, h = out.setdefault(e.task, [0, hashlib.sha256()])
        h.update(json.dumps([e.id, e.prompt_ids, e.answer_ids, e.references]).encode())
        out[e.task][0] = n + 1
    return {task: {"examples": n, "sha256": h.hexdigest()} for task, (n, h) in out.items()}


# ----------------------------------------------------------------------------------------------
# Task orders of the continual setting (METHOD.md section 8)

# The two orders published with the benchmark (order 1: SAPT and GainLoRA; order 2: GainLoRA), by task number.
PUBLISHED_ORDERS = {
    1: "task1572 task363 task1290 task181 task002 task1510 task639 task1729 task073 task1590 task748 task511 task591 "
       "task1687 task875".split(),
    2: "task748 task073 task1590 task639 task1572 task1687 task591 task363 task1510 task1729 task181 task511 task002 "
       "task1290 task875".split(),
}


def task_order(tasks: list[str], order: int, seed: int = 0) -> list[str]:
    """The order in which the continual setting trains `tasks`.

    1 and 2: the benchmark's published orders when every task is one of its 15 (a subset keeps their relative
    order); otherwise (the classroom suite, your own tasks) order 1 is the tasks as listed and order 2 the
    reverse. N >= 3: a permutation of order 1 seeded by N alone, the same for every --seed (this project's
    choice: the paper's other orders are not public). 0: the order of runs made before orders existed,
    shuffled by --seed (kept so that the committed studies rerun as they ran)."""
    if order == 0:
        shuffled = list(tasks)
        random.Random(seed).shuffle(shuffled)
        return shuffled
    number = {t: t.split("_")[0] for t in tasks}
    if all(n in PUBLISHED_ORDERS[1] for n in number.values()):
        first = sorted(tasks, key=lambda t: PUBLISHED_ORDERS[1].index(number[t]))
        if order == 2:
            return sorted(tasks, key=lambda t: PUBLISHED_ORDERS[2].index(number[t]))
    else:
        first = list(tasks)
        if order == 2:
            return first[::-1]
    if order >= 3:
        random.Random(f"order {order}").shuffle(first)
    return first


# ----------------------------------------------------------------------------------------------
# Batching


def batch_order(examples: list[Example], batch_size: int, seed: int, epoch: int, group_by_length=False) -> list[list[int]]:
    """Global batches of indices for one epoch, the same on every data-parallel rank (METHOD.md section 8).

    Plain seeded shuffling (seed, epoch), so a batch mixes tasks as the reference's HF Trainer does.
    Grouping by length, a speed option, sorts each window of 50 batches by length before cutting it
    into batches (less padding) and then shuffles the batches: batches become nearly single-task."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(examples), generator=g).tolist()
    if group_by_length:
        window = 50 * batch_size
        order = [i for s in range(0, len(order), window)
                 for i in sorted(order[s:s + window], key=lambda i: -len(examples[i]))]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    return batches


def collate(examples: list[Example], pad_id: int, device="cpu") -> dict:
    """Tensors (B, L) padded on the right (attention then takes the fused causal path, model.py): ids,
    attention mask, route mask (prompt), answer mask (loss); task ids (B,)."""
    L = max(len(e) for e in examples)
    B = len(examples)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask, route, answer = (torch.zeros(B, L, dtype=torch.long) for _ in range(3))
    for b, e in enumerate(examples):
        seq = e.prompt_ids + e.answer_ids
        ids[b, :len(seq)] = torch.tensor(seq)
        mask[b, :len(seq)] = 1
        route[b, :len(e.prompt_ids)] = 1
        answer[b, len(e.prompt_ids):len(seq)] = 1
    task_ids = torch.tensor([e.task_id for e in examples])
    return {k: v.to(device) for k, v in dict(ids=ids, mask=mask, route=route, answer=answer, task_ids=task_ids).items()}


def answer_loss(model, x, use_task_ids=False):
    """Summed cross-entropy over the answer + EOS tokens of a collated batch (METHOD.md section 7), float32."""
    predicts = x["answer"][:, 1:].bool()  # position t predicts token t + 1
    at = torch.cat([predicts, torch.zeros_like(predicts[:, :1])], 1)
    logits = model(x["ids"], x["mask"], route_mask=x["route"], task_ids=x["task_ids"] if use_task_ids else None,
                   logits_at=at)  # (answer tokens, vocab): no logits where no loss is taken
    return F.cross_entropy(logits.float(), x["ids"][:, 1:][predicts], reduction="sum")


# ----------------------------------------------------------------------------------------------
# The classroom suite: small tasks with the same inputs and conflicting outputs, so that one shared
# adapter must read the definition to know what to do (cross-task interference), plus two
# independent tasks. Generated from fixed seeds: the same on every machine.

WORDS = ("apple river stone cloud tiger paper music green house light window garden bread horse "
         "candle forest silver ocean pencil winter summer rabbit rocket planet").split()
NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()


def _digits(rng):
    return [str(d) for d in rng.sample(range(10), rng.randint(3, 5))]


def _words(rng):
    return rng.sample(WORDS, rng.randint(2, 4))


def _mixed_case(rng):
    return [''.join(c.upper() if rng.random() < 0.5 else c for c in w) for w in _words(rng)]


# name -> (definition, input maker, answer from the input's items)
CLASSROOM_TASKS = {
    "sort_ascending": ("Sort the numbers in ascending order, from smallest to largest.",
                       _digits, lambda xs: " ".join(sorted(xs))),
    "sort_descending": ("Sort the numbers in descending order, from largest to smallest.",
                        _digits, lambda xs: " ".join(sorted(xs, reverse=True))),
    "copy_words": ("Repeat the words exactly as they are given.",
                   _words, lambda xs: " ".join(xs)),
    "reverse_words": ("Write the words in reverse order, last word first.",
                      _words, lambda xs: " ".join(reversed(xs))),
    "uppercase": ("Rewrite the words in upper case letters.",
                  _mixed_case, lambda xs: " ".join(x.upper() for x in xs)),
    "lowercase": ("Rewrite the words in lower case letters.",
                  _mixed_case, lambda xs: " ".join(x.lower() for x in xs)),
    "count_words": ("Count the words and answer with a number written in digits.",
                    _words, lambda xs: str(len(xs))),
    "number_to_word": ("Write the number in English words.",
                       lambda rng: [str(rng.randint(0, 12))], lambda xs: NUMBER_WORDS[int(xs[0])]),
}
CLASSROOM_SIZES = {"train": 48, "dev": 8, "test": 16}


def classroom_task(name: str, split: str) -> Task:
    if name not in CLASSROOM_TASKS:
        raise InputError(f"classroom suite has no task {name!r}; its tasks are {', '.join(CLASSROOM_TASKS)}.")
    if split not in CLASSROOM_SIZES:
        raise InputError(f"split must be one of {', '.join(SPLITS)}, not {split!r}.")
    definition, make_input, answer = CLASSROOM_TASKS[name]
    # Paired tasks share a seed per split, so "sort_ascending" and "sort_descending" see the same inputs.
    pair = {"sort_descending": "sort_ascending", "reverse_words": "copy_words", "lowercase": "uppercase"}.get(name, name)
    rng = random.Random(f"classroom:{pair}:{split}")
    instances = []
    for i in range(CLASSROOM_SIZES[split]):
        items = make_input(rng)
        instances.append({"id": f"{name}-{split}-{i}", "input": " ".join(items), "output": [answer(items)]})
    return Task(name, definition, instances, f"{CLASSROOM}:{name}/{split}")


def export_classroom(out_dir):
    """Write the classroom suite in SuperNI layout: <out>/<task>/{train,dev,test}.json, into a new or empty
    folder (or one an earlier export made), each file atomically."""
    out = new_folder(out_dir, "classroom export", "data.py --export", "--export", also=CLASSROOM_TASKS)
    for name in CLASSROOM_TASKS:
        (out / name).mkdir(exist_ok=True)
        for split in SPLITS:
            task = classroom_task(name, split)
            write_json(out / name / f"{split}.json", {"Definition": [task.definition], "Positive Examples": [],
                                                      "Instances": task.instances})
    print(f"wrote {len(CLASSROOM_TASKS)} tasks to {out}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", metavar="DIR", help="write the classroom suite to DIR in SuperNI layout")
    p.add_argument("--show", metavar="ROOT", help=f"summarise a data root (a folder, '{CLASSROOM}' or '{SUPERNI}')")
    p.add_argument("--download", nargs="+", metavar=("superni", "DIR"), help=f"fetch the benchmark's 15 tasks (METHOD.md "
                   f"section 7) into DIR (default: {superni_cache()}, which --data {SUPERNI} reads; BADIT_CACHE moves "
                   f"it), checking every file against {MANIFEST.name}")
    args = p.parse_args(argv)
    if args.download:
        if args.download[0] != SUPERNI or len(args.download) > 2:
            p.error(f"--download takes {SUPERNI} and at most one folder, e.g. --download {SUPERNI} or --download "
                    f"{SUPERNI} DIR.")
        download_superni(args.download[1] if len(args.download) > 1 else None)
    if args.export:
        export_classroom(args.export)
    if args.show:
        for name in list_tasks(args.show):
            sizes = [len(read_task(args.show, name, s).instances) for s in SPLITS]
            task = read_task(args.show, name, "test")
            print(f"== {name}: train/dev/test = {'/'.join(map(str, sizes))}\n"
                  f"{format_prompt(task.definition, task.instances[0]['input'])}{task.instances[0]['output'][0]}\n")
    if not (args.export or args.show or args.download):
        p.print_help()


if __name__ == "__main__":
    command(main)
