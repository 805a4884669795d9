"""Bad checkpoints give errors that name the file, the field or tensor, and the fix."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import load_model, load_tokenizer


@pytest.fixture
def ckpt(tiny_checkpoints, tmp_path):
    shutil.copytree(tiny_checkpoints["qwen3"], tmp_path / "ckpt")
    return tmp_path / "ckpt"


def edit_config(ckpt, **changes):
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, **changes}))


def edit_weights(ckpt, edit):
    weights = load_file(ckpt / "model.safetensors")
    edit(weights)
    save_file(weights, ckpt / "model.safetensors")


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*prepare_smollm2"):
        load_model(tmp_path / "nowhere")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_model(ckpt)


def test_corrupt_config(ckpt):
    (ckpt / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load_model(ckpt)


def test_config_missing_field(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["hidden_size"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json: field 'hidden_size' is missing"):
        load_model(ckpt)


def test_unsupported_model_type(ckpt):
    edit_config(ckpt, model_type="gpt2")
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported.*llama, mistral, qwen2, qwen3, gemma2"):
        load_model(ckpt)


def test_unsupported_rope_type(ckpt):
    edit_config(ckpt, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0})
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        load_model(ckpt)


def test_wrong_shape(ckpt):
    key = "model.layers.1.mlp.gate_proj.weight"
    edit_weights(ckpt, lambda w: w.update({key: torch.zeros(7, 64)}))
    with pytest.raises(ValueError, match=rf"model.safetensors: tensor '{key}' has shape \(7, 64\).*\(96, 64\)"):
        load_model(ckpt)


def test_missing_tensor(ckpt):
    edit_weights(ckpt, lambda w: w.pop("model.layers.2.self_attn.q_norm.weight"))
    with pytest.raises(ValueError, match="lacks tensors layers.2.self_attn.q_norm.weight"):
        load_model(ckpt)


def test_unexpected_tensor(ckpt):
    edit_weights(ckpt, lambda w: w.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.mlp.extra.weight'"):
        load_model(ckpt)


def test_missing_tokenizer(ckpt):
    with pytest.raises(FileNotFoundError, match="tokenizer.json is missing"):
        load_tokenizer(ckpt)
