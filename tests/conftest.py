"""Shared fixtures: tiny random Hugging Face checkpoints of every supported family.

Each is built with transformers (the reference oracle, a test-only dependency), given random
weights large enough that every feature (norm weights, biases, soft-capping) changes the logits,
and saved with save_pretrained so that our loader reads exactly what users download.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEMO_DIR = Path(os.environ.get("BADIT_DEMO_MODEL", ROOT / "checkpoints" / "SmolLM2-135M-Instruct"))

VOCAB = 96
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)

# name -> (model_type, extra config, how to save). Together they exercise every feature of model.py.
FAMILIES = {
    # Llama-3 rope scaling with positions past the original context (8), biases, untied head.
    "llama3": ("llama", dict(rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=4.0, low_freq_factor=1.0,
                                                  high_freq_factor=4.0, original_max_position_embeddings=8),
                             attention_bias=True, mlp_bias=True), {}),
    # linear rope scaling, tied embeddings, saved in shards
    "llama-linear": ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=500.0, factor=2.0),
                                   tie_word_embeddings=True), dict(max_shard_size="40KB")),
    "mistral": ("mistral", dict(sliding_window=5, rope_parameters=dict(rope_type="default", rope_theta=1e6)), {}),
    "qwen2": ("qwen2", dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=4, max_window_layers=1), {}),
    "qwen3": ("qwen3", dict(head_dim=32, tie_word_embeddings=False), {}),
    "gemma2": ("gemma2", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=4, attn_logit_softcapping=3.0,
                              final_logit_softcapping=8.0, hidden_activation="gelu_pytorch_tanh"), {}),
}


def hf_config(model_type, extra):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**BASE, **extra})


def randomize(model, seed=0):
    """Weights of a scale that makes every path matter; RMSNorm weights away from their init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_((0.0 if model.config.model_type == "gemma2" else 1.0) + 0.2 * noise)
            else:
                p.copy_(0.15 * noise)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """name -> folder of a tiny random checkpoint saved by transformers."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for i, (name, (model_type, extra, save_kwargs)) in enumerate(FAMILIES.items()):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_config(hf_config(model_type, extra), attn_implementation="eager")
        randomize(model, seed=i)
        model.save_pretrained(root / name, **save_kwargs)
        out[name] = root / name
    return out


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def hf_positions(mask):
    """Position ids as transformers' generate derives them from a left-padded mask."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def left_padded_batch(lengths, vocab=VOCAB, seed=0):
    """Random ids (B, max(lengths)), left-padded with pad id 0, and the attention mask."""
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), L), generator=g)
    mask = torch.zeros(len(lengths), L, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, L - n:] = 1
    return ids.masked_fill(mask == 0, 0), mask


@pytest.fixture(scope="session")
def demo_model_dir():
    if not (DEMO_DIR / "model.safetensors").is_file():
        pytest.skip(f"demo model not prepared at {DEMO_DIR}: run python scripts/prepare_smollm2.py")
    return DEMO_DIR


# A slice of the benchmark for the data tests: three tasks, a few instances each, cut at test time from the
# benchmark given with --superni (or BADIT_SUPERNI), never copied into the project. Without it they are skipped.
SLICE = {  # task -> instances of train (first n; glucose: the first 16 with several outputs, then 4 with one), dev, test
    "task002_quoref_answer_generation": (6, 2, 4),
    "task591_sciq_answer_generation": (8, 2, 4),
    "task748_glucose_reverse_cause_event_detection": (None, 2, 6),
}
_SOURCE, _SLICE_DIR = [], []


def pytest_configure(config):
    _SOURCE.append(config.getoption("--superni") or os.environ.get("BADIT_SUPERNI"))


def superni_slice() -> Path:
    """The slice's folder (SuperNI layout), cut once per session; skips the calling test without the benchmark."""
    import json
    import tempfile

    if _SLICE_DIR:
        return _SLICE_DIR[0]
    source = _SOURCE[0] if _SOURCE else None
    if not source or not Path(source).is_dir():
        pytest.skip("needs the SuperNI tasks: `python data.py --download superni`, then "
                    "pytest --superni=$HOME/.cache/badit/superni (or BADIT_SUPERNI=DIR)")
    out = Path(tempfile.mkdtemp(prefix="badit-superni-slice-"))
    for task, counts in SLICE.items():
        (out / task).mkdir()
        for split, n in zip(("train", "dev", "test"), counts):
            data = json.loads((Path(source) / task / f"{split}.json").read_text(encoding="utf-8"))
            data["Positive Examples"], data["Negative Examples"] = data["Positive Examples"][:1], []
            inst = data["Instances"]
            data["Instances"] = inst[:n] if n else ([i for i in inst if len(i["output"]) > 1][:16]
                                                    + [i for i in inst if len(i["output"]) == 1][:4])
            (out / task / f"{split}.json").write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
    _SLICE_DIR.append(out)
    return out


def superni_prompts(root=None, split="test", per_task=1):
    """The prompts (METHOD.md section 7) of the first per_task instances of every task of a SuperNI root (default: the slice)."""
    from data import format_prompt, list_tasks, read_task

    root = root or superni_slice()
    return [format_prompt(t.definition, inst["input"]) for t in (read_task(root, name, split) for name in list_tasks(root))
            for inst in t.instances[:per_task]]


def pytest_addoption(parser):
    parser.addoption("--superni", metavar="DIR", help="the benchmark's 15 tasks, for the tests marked superni; give it "
                     "as --superni=DIR, so that pytest does not take DIR for a test path "
                     "(default: $BADIT_SUPERNI; `python data.py --download superni` puts them in ~/.cache/badit/superni)")


@pytest.fixture(scope="session")
def superni_dir(request):
    """The full benchmark, from --superni or BADIT_SUPERNI; the tests that need it are skipped without it."""
    folder = request.config.getoption("--superni") or os.environ.get("BADIT_SUPERNI")
    if not folder:
        pytest.skip("needs the 15 SuperNI tasks: `python data.py --download superni`, then "
                    "pytest --superni=$HOME/.cache/badit/superni (or BADIT_SUPERNI=DIR)")
    if not Path(folder).is_dir():
        pytest.fail(f"--superni {folder} is not a folder")
    return Path(folder)


def left_pad(seqs, pad_id):
    L = max(map(len, seqs))
    ids = torch.tensor([[pad_id] * (L - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (L - len(s)) + [1] * len(s) for s in seqs])
    return ids, mask


def byte_tokenizer(folder):
    """A byte-level tokenizer (256 bytes, no merges) with <|im_end|> as EOS, saved as HF files."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(["<|im_end|>"])
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    return tk.get_vocab_size()


@pytest.fixture(scope="session")
def tiny_trainable(tmp_path_factory):
    """A tiny random Llama checkpoint with a byte-level tokenizer: train.py runs on it in seconds."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("tiny_trainable")
    vocab = byte_tokenizer(folder)
    cfg = hf_config("llama", dict(vocab_size=vocab, eos_token_id=vocab - 1, pad_token_id=None, bos_token_id=None,
                                  max_position_embeddings=512))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    return folder


def cut_and_resume(monkeypatch, train_argv, out, at_step, between=None):
    """The interrupt-and-resume the tests repeat: train.py with train_argv into `out`, stopped by a real SIGINT during
    optimizer step `at_step` (exit 130, a checkpoint), then `train.py --out OUT --resume`. between(): called after
    the interrupt's patch is undone (with every other monkeypatch of the test) and before the resume."""
    import train

    interrupt_at(monkeypatch, at_step)
    with pytest.raises(SystemExit) as stop:
        train.main([*map(str, train_argv), "--out", str(out)])
    assert stop.value.code == 130
    monkeypatch.undo()
    if between:
        between()
    train.main(["--out", str(out), "--resume"])


def interrupt_at(monkeypatch, at_step):
    """Send this process a real SIGINT during the forward-backward of optimizer step `at_step` (counted over
    the whole run), as a Ctrl-C would arrive."""
    import signal

    import train

    original, calls = train.backward_global_batch, []

    def backward_global_batch(*args):
        calls.append(1)
        if len(calls) == at_step:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args)

    monkeypatch.setattr(train, "backward_global_batch", backward_global_batch)
