"""Shared fixtures: tiny random checkpoints of the real architecture, and their exports."""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as exporter/cli.py: before NumPy loads

import copy  # noqa: E402
from pathlib import Path

import pytest
import torch

from default_model import CHECKPOINT_DIR
from exporter.onnx.backend import OnnxOptions, export_onnx
from quant.schemes import QuantOptions
from graphs.random_checkpoint import write_random_checkpoint

TINY_TEXT = {
    "model_type": "qwen3_5_text",
    "vocab_size": 320,
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "intermediate_size": 128,
    "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"],
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 2,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 4,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25,
                        "mrope_section": [2, 1, 1], "mrope_interleaved": True},
    "tie_word_embeddings": True,
}


def tiny_config(*, value_heads: int = 2, tie: bool = True, multimodal: bool = False) -> dict:
    """A tiny config; value_heads=4 gives the 4B/9B layout (Hv = 2·Hk). multimodal nests it like the
    published checkpoints (model_type qwen3_5 with text_config)."""
    text = copy.deepcopy(TINY_TEXT)
    text["linear_num_value_heads"] = value_heads
    text["tie_word_embeddings"] = tie
    if not multimodal:
        return text
    text["model_type"] = "qwen3_5_text"
    return {"model_type": "qwen3_5", "architectures": ["Qwen3_5ForConditionalGeneration"],
            "tie_word_embeddings": tie, "text_config": text}


LAYOUTS = {
    # name: (config kwargs, checkpoint writer kwargs)
    "kv_equal_tied": (dict(value_heads=2, tie=True), dict(multimodal_names=False)),
    "kv_double_untied": (dict(value_heads=4, tie=False, multimodal=True), dict(multimodal_names=True)),
}


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for name, (cfg_kwargs, writer_kwargs) in LAYOUTS.items():
        out[name] = write_random_checkpoint(tiny_config(**cfg_kwargs), root / name, seed=7,
                                            dtype=torch.float32, **writer_kwargs)
    return out


@pytest.fixture(scope="session")
def tiny_exports(tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each tiny layout exported; the Hv = 2·Hk one with contrib ops, so both forms are exercised."""
    root = tmp_path_factory.mktemp("exports")
    forms = {"kv_equal_tied": "standard", "kv_double_untied": "contrib"}
    return {name: export_onnx(ck, root / name, options=OnnxOptions(forms[name], all_logits=True), progress=False)
            for name, ck in tiny_checkpoints.items()}


@pytest.fixture(scope="session")
def default_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx("default", tmp_path_factory.mktemp("default") / "export", progress=False)


@pytest.fixture(scope="session")
def default_contrib_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model, fp32 and q4, with the com.microsoft recurrent ops that app runtimes load."""
    return export_onnx("default", tmp_path_factory.mktemp("contrib") / "export", "fp32,q4", OnnxOptions("contrib"),
                       progress=False)


@pytest.fixture(scope="session")
def default_checkpoint() -> Path:
    return CHECKPOINT_DIR


ALL_SCHEMES = "fp32,fp16,q8,q4,q4f16"
DEFAULT_VARIANTS = ALL_SCHEMES + ",q4mix"  # and the mixed recipe, held to the q4 gate on the trained model


@pytest.fixture(scope="session")
def default_all_variants(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model in every scheme, written by one export call."""
    return export_onnx("default", tmp_path_factory.mktemp("variants") / "export", DEFAULT_VARIANTS, progress=False)


@pytest.fixture(scope="session")
def tiny_untied_quantized(tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(tiny_checkpoints["kv_double_untied"], tmp_path_factory.mktemp("untied") / "export",
                       ALL_SCHEMES, OnnxOptions("contrib", QuantOptions(64, False, 4), all_logits=True), progress=False)


COREML_CONTEXT = 256


@pytest.fixture(scope="session")
def default_coreml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model as Core ML packages (fp32 and int4), context 256; shared by the Core ML and ios tests."""
    from exporter.coreml.backend import CoreMLOptions, export_coreml

    return export_coreml("default", tmp_path_factory.mktemp("coreml") / "default", "fp32,q4",
                         CoreMLOptions(context=COREML_CONTEXT), progress=False)
