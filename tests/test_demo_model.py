"""The offline demo model (scripts/prepare_smollm2.py) against transformers reading the same GGUF."""

import pytest
import torch

from conftest import ROOT, hf_positions, left_pad, superni_prompts
from hf import load_model, load_tokenizer, read_model_args
from model import generate

GGUF_DIR, GGUF_FILE = ROOT / "checkpoints" / "gguf", "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_config_facts(demo_model_dir):
    args = read_model_args(demo_model_dir)
    assert (args.n_layers, args.dim, args.n_heads, args.n_kv_heads, args.vocab_size) == (30, 576, 9, 3, 49152)
    assert args.rope_theta == 1e5 and args.tie_embeddings


def test_tokenizer(demo_model_dir):
    tok = load_tokenizer(demo_model_dir)
    assert tok.encode("Hello world, this is a test.") == [19556, 905, 28, 451, 314, 253, 1028, 30]
    assert tok.tk.id_to_token(tok.eos_token_id) == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id
    assert tok.bos_token_id == 1 and tok.stop_token_ids == [2]
    digits = tok.encode("2026")  # SmolLM's pre-tokenizer splits numbers into single digits
    assert [tok.decode([i]) for i in digits] == ["2", "0", "2", "6"]
    text = superni_prompts()[1]
    assert tok.decode(tok.encode(text)) == text


@pytest.fixture(scope="module")
def hf_gguf_model():
    if not (GGUF_DIR / GGUF_FILE).is_file():
        pytest.skip("GGUF not downloaded: run python scripts/prepare_smollm2.py")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(GGUF_DIR, gguf_file=GGUF_FILE, dtype=torch.float32).eval()


@pytest.mark.slow
def test_tokenizer_matches_gguf_tokenizer(demo_model_dir):
    """transformers' GGUF tokenizer lacks SmolLM's digit split, so compare on digit-free text."""
    from transformers import AutoTokenizer

    if not (GGUF_DIR / GGUF_FILE).is_file():
        pytest.skip("GGUF not downloaded")
    ref = AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_FILE)
    tok = load_tokenizer(demo_model_dir)
    for text in [p for p in superni_prompts(split="train", per_task=20) if not any(c.isdigit() for c in p)]:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=True)


@pytest.mark.slow
def test_logits_and_greedy_continuation_match_transformers(demo_model_dir, hf_gguf_model):
    tok = load_tokenizer(demo_model_dir)
    ids, mask = left_pad([tok.encode(p)[-120:] for p in superni_prompts()], tok.pad_token_id)
    ours = load_model(demo_model_dir, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        logits = ours(ids, mask)
        ref = hf_gguf_model(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
    real = mask.bool()
    torch.testing.assert_close(logits[real], ref[real], atol=1e-4, rtol=0)

    out = generate(ours, ids, mask, max_new_tokens=30, eos_token_id=tok.stop_token_ids, pad_token_id=tok.pad_token_id)
    ref_out = hf_gguf_model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False,
                                     eos_token_id=tok.stop_token_ids, pad_token_id=tok.pad_token_id)
    assert torch.equal(out, ref_out)
    assert (out[:, ids.shape[1]:] != tok.pad_token_id).sum() >= 30  # it really generated text


def test_bos_follows_tokenizer_json_as_transformers(demo_model_dir, tmp_path):
    """transformers 5 leaves BOS to tokenizer.json's post-processor, even when tokenizer_config.json
    says add_bos_token: our tokenizer must encode exactly as it does."""
    import json
    import shutil

    from transformers import AutoTokenizer

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_model_dir / name, tmp_path / name)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": True}))
    ours, ref = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    text = "Hello world, this is a test."
    assert ours.encode(text) == ref.encode(text) == [19556, 905, 28, 451, 314, 253, 1028, 30]
