"""data.py on real SuperNI instances (conftest.superni_slice: three tasks, a few instances each, cut from --superni):
the prompt, label masks, truncation, output choice, batching, the classroom suite, the errors bad data
gives, and the benchmark's download against a local server."""

import json

import pytest

from conftest import superni_slice
from data import (CLASSROOM, CLASSROOM_TASKS, PROMPT, batch_order, classroom_task, collate, encode_examples,
                  export_classroom, format_prompt, list_tasks, load_tasks, read_task)
from hf import load_tokenizer


@pytest.fixture(scope="module")
def tok(demo_model_dir):
    return load_tokenizer(demo_model_dir)


def test_prompt_is_spec_exact(tok):
    assert PROMPT == "{definition}\n\nNow complete the following example -\nInput: {input}\nOutput: "
    task = read_task(superni_slice(), "task591_sciq_answer_generation", "train")
    with open(superni_slice() / "task591_sciq_answer_generation" / "train.json") as f:
        raw = json.load(f)
    assert task.definition == " ".join(raw["Definition"])
    ex = encode_examples(tok, [task], [task.name], max_len=1024, seed=0)[0]
    inst = raw["Instances"][0]
    assert tok.decode(ex.prompt_ids, skip_special_tokens=False) == (
        f"{task.definition}\n\nNow complete the following example -\nInput: {inst['input']}\nOutput: ")
    assert ex.answer_ids[-1] == tok.eos_token_id
    assert tok.decode(ex.answer_ids[:-1]) in inst["output"]


def test_long_inputs_are_shortened_at_the_end_only(tok):
    task = read_task(superni_slice(), "task002_quoref_answer_generation", "train")  # paragraphs of 400-700 tokens
    examples = encode_examples(tok, [task], [task.name], max_len=200, max_answer_len=10, seed=0)
    cut = 0
    for ex, inst in zip(examples, task.instances):
        assert len(ex) <= 200
        text = tok.decode(ex.prompt_ids, skip_special_tokens=False)
        head = f"{task.definition}\n\nNow complete the following example -\nInput: "
        assert text.startswith(head) and text.endswith("\nOutput: ")  # the definition and the template are whole
        kept = text[len(head):-len("\nOutput: ")]
        assert inst["input"].startswith(kept)  # the input lost its end, nothing else
        cut += kept != inst["input"]
        full = tok.encode(inst["output"][0], add_special_tokens=False)
        assert ex.answer_ids == full[:10] + [tok.eos_token_id]  # the answer is cut to max_answer_len, never by max_len
        assert len(ex) >= 200 - 3 or kept == inst["input"]  # shortened inputs fill the budget
    assert cut == len(task.instances) == 6


def test_definition_too_long_for_max_len(tok):
    task = read_task(superni_slice(), "task748_glucose_reverse_cause_event_detection", "train")  # a definition of ~90 tokens
    with pytest.raises(ValueError, match=r"task748_glucose_reverse_cause_event_detection/train.json: the 'Definition'.*raise --max-len"):
        encode_examples(tok, [task], [task.name], max_len=120)


def test_seeded_output_choice_and_references(tok):
    task = read_task(superni_slice(), "task748_glucose_reverse_cause_event_detection", "train")
    task.instances = [i for i in task.instances if len(i["output"]) > 1]
    assert len(task.instances) == 16
    pick = lambda seed: [tok.decode(e.answer_ids[:-1]) for e in encode_examples(tok, [task], [task.name], seed=seed)]  # noqa: E731
    a, b, c = pick(0), pick(0), pick(1)
    assert a == b and a != c
    assert all(x in i["output"] for x, i in zip(a, task.instances))
    evals = encode_examples(tok, [task], [task.name], train=False)
    assert all(e.answer_ids == [] and e.references == i["output"] for e, i in zip(evals, task.instances))


def test_collate_masks_and_task_ids(tok):
    tasks = load_tasks(superni_slice(), ["task591_sciq_answer_generation", "task748_glucose_reverse_cause_event_detection"], "train", limit=3)
    names = ["task748_glucose_reverse_cause_event_detection", "task591_sciq_answer_generation"]
    examples = encode_examples(tok, tasks, names, max_len=256)
    x = collate(examples, tok.pad_token_id)
    L = max(len(e) for e in examples)
    assert x["ids"].shape == (6, L)
    for b, e in enumerate(examples):
        assert x["mask"][b, :len(e)].all() and x["mask"][b, len(e):].sum() == 0  # padding on the right
        assert x["ids"][b, x["route"][b].bool()].tolist() == e.prompt_ids
        assert x["ids"][b, x["answer"][b].bool()].tolist() == e.answer_ids
    assert x["task_ids"].tolist() == [1, 1, 1, 0, 0, 0]


def test_batch_order_is_a_seeded_partition_and_groups_lengths(tok):
    tasks = load_tasks(superni_slice(), list_tasks(superni_slice()), "train")  # 34 examples of 3 tasks, 20 to 700 tokens
    examples = encode_examples(tok, tasks, [t.name for t in tasks], max_len=512)
    grouped = batch_order(examples, 4, seed=0, epoch=0, group_by_length=True)
    assert sorted(i for b in grouped for i in b) == list(range(len(examples)))
    assert grouped == batch_order(examples, 4, seed=0, epoch=0, group_by_length=True) != batch_order(examples, 4, seed=0, epoch=1, group_by_length=True)
    plain = batch_order(examples, 4, seed=0, epoch=0)  # METHOD.md section 8: plain seeded shuffling by default
    assert sorted(i for b in plain for i in b) == list(range(len(examples)))
    tasks_per_batch = lambda batches: sum(len({examples[i].task for i in b}) for b in batches) / len(batches)  # noqa: E731
    assert tasks_per_batch(plain) > tasks_per_batch(grouped)  # plain batches mix the tasks
    padding = lambda batches: sum(max(len(examples[i]) for i in b) * len(b) - sum(len(examples[i]) for i in b) for b in batches)  # noqa: E731
    assert padding(grouped) < 0.5 * padding(plain)


def test_classroom_suite_is_deterministic_and_conflicting(tmp_path):
    assert len(CLASSROOM_TASKS) >= 6
    for name in CLASSROOM_TASKS:
        assert classroom_task(name, "train").instances == classroom_task(name, "train").instances
    for a, b in (("sort_ascending", "sort_descending"), ("copy_words", "reverse_words"), ("uppercase", "lowercase")):
        ta, tb = classroom_task(a, "test"), classroom_task(b, "test")
        assert [i["input"] for i in ta.instances] == [i["input"] for i in tb.instances]
        assert sum(i["output"] != j["output"] for i, j in zip(ta.instances, tb.instances)) >= len(ta.instances) // 2
    train = {i["input"] for i in classroom_task("uppercase", "train").instances}
    assert classroom_task("uppercase", "test").instances[0]["output"] == [classroom_task("uppercase", "test").instances[0]["input"].upper()]
    assert len(train) > 40
    export_classroom(tmp_path)
    assert list_tasks(tmp_path) == sorted(CLASSROOM_TASKS)
    for name in CLASSROOM_TASKS:
        for split in ("train", "dev", "test"):
            on_disk, embedded = read_task(tmp_path, name, split), read_task(CLASSROOM, name, split)
            assert (on_disk.definition, on_disk.instances) == (embedded.definition, embedded.instances)


# ----------------------------------------------------------------------------------------------
# Bad data


@pytest.fixture
def root(tmp_path):
    (tmp_path / "t").mkdir()
    return tmp_path


def write(root, data, split="train"):
    (root / "t" / f"{split}.json").write_text(data if isinstance(data, str) else json.dumps(data))


GOOD = {"Definition": ["Do it."], "Instances": [{"id": "1", "input": "x", "output": ["y"]}]}


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data root .*nowhere does not exist.*--data"):
        load_tasks(tmp_path / "nowhere")


def test_missing_task(root):
    write(root, GOOD)
    with pytest.raises(FileNotFoundError, match="task 'other' not found.*available: t"):
        read_task(root, "other", "train")


def test_missing_split(root):
    write(root, GOOD)
    with pytest.raises(FileNotFoundError, match=r"t/test.json is missing.*train.json, dev.json, test.json"):
        read_task(root, "t", "test")


def test_malformed_json(root):
    write(root, '{"Definition": ["x"],\n "Instances": [')
    with pytest.raises(ValueError, match=r"t/train.json: not valid JSON \(line 2"):
        read_task(root, "t", "train")


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("Definition"), r"train.json: field 'Definition' is missing"),
    (lambda d: d.pop("Instances"), r"train.json: field 'Instances' is missing"),
    (lambda d: d["Instances"][0].pop("input"), r"train.json: Instances\[0\] has no field 'input'"),
    (lambda d: d["Instances"][0].pop("output"), r"train.json: Instances\[0\] has no field 'output'"),
    (lambda d: d["Instances"][0].update(output=[]), r"Instances\[0\].output must be a non-empty list of strings"),
    (lambda d: d.update(Instances=[]), r"train.json: field 'Instances' is empty"),
])
def test_bad_fields(root, edit, message):
    data = json.loads(json.dumps(GOOD))
    edit(data)
    write(root, data)
    with pytest.raises(ValueError, match=message):
        read_task(root, "t", "train")


def test_unknown_classroom_task():
    with pytest.raises(ValueError, match="classroom suite has no task 'nope'"):
        load_tasks(CLASSROOM, ["nope"])


def test_format_prompt_keeps_braces():
    assert format_prompt("Use {x}.", "a {b}") == "Use {x}.\n\nNow complete the following example -\nInput: a {b}\nOutput: "


def test_task_orders_of_the_continual_setting():
    import random

    from data import PUBLISHED_ORDERS, task_order

    benchmark = ["task002_quoref_answer_generation", "task073_commonsenseqa_answer_generation", "task1290_xsum_summarization",
                 "task1510_evalution_relation_extraction", "task1572_samsum_summary", "task1590_diplomacy_text_generation",
                 "task1687_sentiment140_classification", "task1729_personachat_generate_next", "task181_outcome_extraction",
                 "task363_sst2_polarity_classification", "task511_reddit_tifu_long_text_summarization",
                 "task591_sciq_answer_generation", "task639_multi_woz_user_utterance_generation",
                 "task748_glucose_reverse_cause_event_detection", "task875_emotion_classification"]  # sorted, as list_tasks gives
    one, two = task_order(benchmark, 1), task_order(benchmark, 2)
    assert [t.split("_")[0] for t in one] == PUBLISHED_ORDERS[1] and one[0] == "task1572_samsum_summary"
    assert [t.split("_")[0] for t in two] == PUBLISHED_ORDERS[2] and two[-1] == "task875_emotion_classification"
    assert task_order(benchmark[:4], 1) == [t for t in one if t in benchmark[:4]]  # a subset keeps the relative order
    suite = list(CLASSROOM_TASKS)
    assert task_order(suite, 1) == suite and task_order(suite, 2) == suite[::-1]
    three = task_order(suite, 3)
    assert sorted(three) == sorted(suite) and three not in (suite, suite[::-1])
    assert task_order(suite, 3, seed=5) == three != task_order(suite, 4)  # seeded by the order, not by --seed
    legacy = list(suite)
    random.Random(7).shuffle(legacy)
    assert task_order(suite, 0, seed=7) == legacy  # runs made before orders: shuffled by --seed


# ---------------------------------------------------------------------------------------------- the benchmark's download


class Server:
    """The fixture tree over HTTP on 127.0.0.1 (Python's http.server in a thread), counting requests;
    broken: names served with wrong bytes; dies: names whose response stops half way (the server goes away)."""

    def __init__(self, root, broken=(), dies=()):
        import functools
        import http.server
        import threading

        self.requests, outer = [], self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                outer.requests.append(name)
                if name in broken or name in dies:
                    body = (root / name).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[:len(body) // 2] + (b"x" * (len(body) - len(body) // 2) if name in broken else b""))
                    return
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def fixture_manifest():
    from data import sha256

    return {f"{p.parent.name}/{p.name}": sha256(p) for p in sorted(superni_slice().glob("*/*.json"))}


def test_the_download_checks_every_file_and_fetches_only_what_is_missing(tmp_path):
    from data import download_superni

    files, server = fixture_manifest(), Server(superni_slice())
    try:
        dest = download_superni(tmp_path / "cache", server.url, files)
        assert sorted(server.requests) == sorted(files) and len(files) == 9
        assert all((dest / name).read_bytes() == (superni_slice() / name).read_bytes() for name in files)
        (dest / "task591_sciq_answer_generation" / "dev.json").unlink()  # a download stopped before its end
        server.requests.clear()
        download_superni(dest, server.url, files)
        assert server.requests == ["task591_sciq_answer_generation/dev.json"]  # the verified files are not fetched again
        assert list_tasks(dest) == list_tasks(superni_slice())
    finally:
        server.close()


@pytest.mark.parametrize("fault, message", [("broken", "does not match its sha256"), ("dies", "could not download")])
def test_a_corrupted_or_cut_download_leaves_no_file_behind(tmp_path, fault, message):
    from data import download_superni

    name = "task002_quoref_answer_generation/train.json"
    files, server = fixture_manifest(), Server(superni_slice(), **{fault: [name]})
    try:
        with pytest.raises(ValueError, match=message) as refusal:
            download_superni(tmp_path / "cache", server.url, files)
        assert f"{server.url}/{name}" in str(refusal.value) and "To place the files by hand" in str(refusal.value)
        assert str(tmp_path / "cache") in str(refusal.value)
        assert not (tmp_path / "cache" / name).exists()
        assert not list((tmp_path / "cache").rglob("*.part"))  # no half file
    finally:
        server.close()


def test_offline_and_a_file_of_yours_are_refused_clearly(tmp_path):
    from data import download_superni

    files = fixture_manifest()
    with pytest.raises(ValueError, match=r"could not download http://127.0.0.1:9/task002.*offline, or the server refused it"):
        download_superni(tmp_path / "cache", "http://127.0.0.1:9", files)  # nothing listens on port 9
    mine = tmp_path / "mine" / "task002_quoref_answer_generation"
    mine.mkdir(parents=True)
    (mine / "dev.json").write_text("{}")
    with pytest.raises(ValueError, match="is not the benchmark's file .* nothing was replaced"):
        download_superni(tmp_path / "mine", "http://127.0.0.1:9", files)
    assert (mine / "dev.json").read_text() == "{}"


def test_data_superni_is_the_cache_and_offers_the_download(tmp_path, monkeypatch):
    import data

    monkeypatch.setenv("BADIT_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"--data superni is the benchmark in .*lacks 45 of its 45 files.*"
                                                r"python data.py --download superni"):
        list_tasks("superni")
    assert len(data.manifest()) == 45 and len({n.split("/")[0] for n in data.manifest()}) == 15


@pytest.mark.superni
def test_the_benchmark_matches_its_manifest_and_reads(superni_dir, tok):
    from data import PUBLISHED_ORDERS, manifest, sha256

    files = manifest()
    assert {name: sha256(superni_dir / name) for name in files} == files
    assert sorted(t.split("_")[0] for t in list_tasks(superni_dir)) == sorted(PUBLISHED_ORDERS[1])
    for task in load_tasks(superni_dir, split="test", limit=5):
        examples = encode_examples(tok, [task], [task.name], max_len=1024, train=False)
        assert len(examples) == 5 and all(len(e.prompt_ids) <= 1024 - 50 for e in examples)
