"""Checkpoint loading: layouts, shards, dtypes, parts the decoder ignores, and lazy reads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from graphs.checkpoint import open_checkpoint
from graphs.config import preset_config_dict, preset_names, text_config_from_dict
from graphs.errors import QwenEdgeError
from graphs.random_checkpoint import write_random_checkpoint
from tests.conftest import tiny_config


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dtypes_load_as_fp32_with_the_same_values(dtype, tmp_path):
    ck = write_random_checkpoint(tiny_config(), tmp_path, dtype=dtype, multimodal_names=False)
    model = open_checkpoint(ck).build_decoder()
    raw = load_file(ck / "model.safetensors")
    for name, value in _params(model).items():
        assert value.dtype == torch.float32
        key = "model." + name if "model." + name in raw else "model.embed_tokens.weight"  # tied lm_head
        torch.testing.assert_close(value, raw[key].float(), rtol=0, atol=0)


def test_sharded_equals_single_file(tmp_path):
    cfg = tiny_config(value_heads=4, tie=False, multimodal=True)
    single = write_random_checkpoint(cfg, tmp_path / "single", seed=3)
    sharded = write_random_checkpoint(cfg, tmp_path / "sharded", seed=3, max_shard_bytes=60_000)
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 2 and (sharded / "model.safetensors.index.json").is_file()
    a, b = _params(open_checkpoint(single).build_decoder()), _params(open_checkpoint(sharded).build_decoder())
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_missing_shard_named_by_index(tmp_path):
    ck = write_random_checkpoint(tiny_config(), tmp_path, max_shard_bytes=60_000)
    victim = sorted(ck.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(QwenEdgeError, match=f"shard {victim.name} named in model.safetensors.index.json is missing"):
        open_checkpoint(ck)


def test_mtp_weights_are_ignored(tmp_path):
    ck = write_random_checkpoint(tiny_config(multimodal=True), tmp_path, multimodal_names=True)
    tensors = load_file(ck / "model.safetensors")
    tensors["mtp.fc.weight"] = torch.zeros(4, 4)
    save_file(tensors, ck / "model.safetensors")
    checkpoint = open_checkpoint(ck)
    assert checkpoint.vision is None  # a qwen3_5 checkpoint shipped without its tower exports text only
    model = checkpoint.build_decoder()
    assert model.lm_head.weight is model.embed_tokens.weight  # tied


def test_vision_tower_is_loaded_and_shape_checked(tmp_path):
    from tests.vision_checkpoint import TINY_VISION

    config = dict(tiny_config(multimodal=True), vision_config=dict(TINY_VISION))
    ck = write_random_checkpoint(config, tmp_path / "ok", multimodal_names=True)
    checkpoint = open_checkpoint(ck)
    assert checkpoint.vision.depth == 2 and checkpoint.vision.patch_dim == 1536
    encoder = checkpoint.build_vision_encoder()
    torch.testing.assert_close(encoder.blocks[1].attn.qkv.weight,
                               load_file(ck / "model.safetensors")["model.visual.blocks.1.attn.qkv.weight"].float())
    tensors = load_file(ck / "model.safetensors")
    tensors["model.visual.blocks.0.attn.qkv.weight"] = torch.zeros(4, 4)
    save_file(tensors, ck / "model.safetensors")
    with pytest.raises(QwenEdgeError, match="'model.visual.blocks.0.attn.qkv.weight' has shape \\[4, 4\\] but config.json"):
        open_checkpoint(ck)
    del tensors["model.visual.merger.linear_fc2.weight"]
    tensors["model.visual.blocks.0.attn.qkv.weight"] = torch.zeros(96, 32)
    save_file(tensors, ck / "model.safetensors")
    with pytest.raises(QwenEdgeError, match="tensor 'merger.linear_fc2.weight' is missing from the weights; the vision tower"):
        open_checkpoint(ck)


def test_untied_head_is_its_own_tensor(tmp_path):
    ck = write_random_checkpoint(tiny_config(tie=False), tmp_path, multimodal_names=False)
    model = open_checkpoint(ck).build_decoder()
    assert model.lm_head.weight.data_ptr() != model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(model.lm_head.weight, load_file(ck / "model.safetensors")["lm_head.weight"].float())


def test_extra_layer_is_reported(tmp_path):
    ck = write_random_checkpoint(tiny_config(), tmp_path, multimodal_names=False)
    tensors = load_file(ck / "model.safetensors")
    tensors["model.layers.9.mlp.up_proj.weight"] = torch.zeros(128, 64)
    save_file(tensors, ck / "model.safetensors")
    with pytest.raises(QwenEdgeError, match="'layers.9.mlp.up_proj.weight' is not part of the decoder"):
        open_checkpoint(ck)


def test_validation_reads_headers_only(tmp_path, monkeypatch):
    """open_checkpoint checks every shape without reading a single tensor."""
    ck = write_random_checkpoint(tiny_config(), tmp_path, multimodal_names=False)
    import safetensors

    calls = []
    real = safetensors.safe_open

    class Spy:
        def __init__(self, *a, **k):
            self.inner = real(*a, **k)

        def __enter__(self):
            self.handle = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.handle.keys()

        def get_slice(self, key):
            return self.handle.get_slice(key)

        def get_tensor(self, key):
            calls.append(key)
            return self.handle.get_tensor(key)

    monkeypatch.setattr("graphs.checkpoint.safe_open", Spy)
    open_checkpoint(ck)
    assert calls == []


@pytest.mark.parametrize("name", preset_names())
def test_presets_are_the_real_shapes(name):
    cfg = text_config_from_dict(preset_config_dict(name))
    assert cfg.num_hidden_layers in (24, 32) and cfg.vocab_size == 248320
    assert cfg.layer_types.count("full_attention") * 4 == cfg.num_hidden_layers
    assert cfg.conv_dim == 2 * 16 * 128 + cfg.linear_num_value_heads * 128
    assert cfg.rotary_dim == 64 and sum(cfg.mrope_section) == 32


def test_config_errors_are_specific(tmp_path):
    cfg = tiny_config()
    cfg["layer_types"] = cfg["layer_types"][:3]
    with pytest.raises(QwenEdgeError, match="layer_types has 3 entries but num_hidden_layers is 4"):
        text_config_from_dict(cfg)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(QwenEdgeError, match="not valid JSON"):
        open_checkpoint(tmp_path)
    with pytest.raises(QwenEdgeError, match="missing 'hidden_size'"):
        text_config_from_dict({k: v for k, v in tiny_config().items() if k != "hidden_size"})
    assert json.loads(json.dumps(tiny_config(multimodal=True)))["text_config"]["model_type"] == "qwen3_5_text"
