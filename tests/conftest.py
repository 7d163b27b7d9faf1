"""Shared fixtures: tiny random checkpoints of the real architecture, and their exports."""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as exporter/cli.py: before NumPy loads

import copy  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path
from typing import Callable, TypeVar

import pytest
import torch
from filelock import FileLock
from hypothesis import HealthCheck, settings

from default_model import CHECKPOINT_DIR
from exporter.onnx.backend import OnnxOptions, export_onnx
from quant.schemes import SCHEMES, QuantOptions
from graphs.random_checkpoint import write_random_checkpoint

# Property-based tests (tests/test_fuzz.py): 200 examples each by default; a long run sets
# QWEN_EDGE_FUZZ_EXAMPLES=10000. No deadline: the machine is shared, and a slow example is not a bug.
settings.register_profile("qwen-edge", max_examples=int(os.environ.get("QWEN_EDGE_FUZZ_EXAMPLES", "200")),
                          deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                HealthCheck.too_slow])
settings.load_profile("qwen-edge")

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


if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # `make test` runs two workers on two cores: one thread each, no oversubscription

Built = TypeVar("Built", Path, dict)


def built_once(factory: pytest.TempPathFactory, name: str, build: Callable[[Path], Built]) -> Built:
    """Build a session artifact in its own folder, once per test run.

    Under pytest-xdist each worker is a process with its own session fixtures; the exports below take
    minutes, so the first worker to ask builds under a lock in the run's shared temp folder and the others
    read its result. Without xdist this is a plain mktemp."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return build(factory.mktemp(name))
    root = factory.getbasetemp().parent / "built_once" / name
    root.parent.mkdir(exist_ok=True)
    record = root.parent / f"{name}.json"
    with FileLock(str(root.parent / f"{name}.lock")):
        if not record.exists():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            result = build(root)
            as_json = {k: str(v) for k, v in result.items()} if isinstance(result, dict) else str(result)
            record.write_text(json.dumps(as_json))
    stored = json.loads(record.read_text())
    return {k: Path(v) for k, v in stored.items()} if isinstance(stored, dict) else Path(stored)


LAYOUTS = {
    # name: (config kwargs, checkpoint writer kwargs)
    "kv_equal_tied": (dict(value_heads=2, tie=True), dict(multimodal_names=False)),
    "kv_double_untied": (dict(value_heads=4, tie=False, multimodal=True), dict(multimodal_names=True)),
}


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    def build(root: Path) -> dict[str, Path]:
        return {name: write_random_checkpoint(tiny_config(**cfg_kwargs), root / name, seed=7, dtype=torch.float32,
                                              **writer_kwargs)
                for name, (cfg_kwargs, writer_kwargs) in LAYOUTS.items()}
    return built_once(tmp_path_factory, "checkpoints", build)


JS_DIR = Path(__file__).resolve().parent / "js"  # the Node harness (transformers.js, onnxruntime-node)


@pytest.fixture(scope="session")
def node() -> str:
    """The Node binary for the transformers.js checks, with the harness's packages installed."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed; the web bundle is checked with transformers.js on Node")
    if not (JS_DIR / "node_modules" / "@huggingface" / "transformers").is_dir():
        pytest.fail("tests/js/node_modules is missing: run 'make tests/js/node_modules/.package-lock.json'")
    return node


@pytest.fixture(scope="session")
def tiny_exports(tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each tiny layout exported; the Hv = 2·Hk one with contrib ops, so both forms are exercised."""
    forms = {"kv_equal_tied": "standard", "kv_double_untied": "contrib"}
    return built_once(tmp_path_factory, "exports", lambda root: {
        name: export_onnx(ck, root / name, options=OnnxOptions(forms[name], all_logits=True), progress=False)
        for name, ck in tiny_checkpoints.items()})


@pytest.fixture(scope="session")
def tiny_bundle(tiny_exports: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An Android bundle of a tiny contrib export; tests that change it restore it."""
    from exporter.package.build import package_export

    out = tmp_path_factory.mktemp("tiny-bundle") / "bundle"
    package_export(tiny_exports["kv_double_untied"], out, "android")
    return out


@pytest.fixture(scope="session")
def tiny_mtp_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint with an MTP head (`mtp.*`, random like the rest), in the published layout, with
    the default model's tokenizer (its vocabulary size) so that `generate` runs on it."""
    def build(root: Path) -> Path:
        config = tiny_config(tie=False, multimodal=True)  # tied random embeddings just repeat the last token
        config["text_config"].update(mtp_num_hidden_layers=1, vocab_size=1024)
        folder = write_random_checkpoint(config, root / "checkpoint", seed=11, dtype=torch.float32,
                                         multimodal_names=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            shutil.copy(CHECKPOINT_DIR / name, folder / name)
        return folder
    return built_once(tmp_path_factory, "mtp", build)


@pytest.fixture(scope="session")
def tiny_mtp_export(tiny_mtp_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """That checkpoint exported with the default options (fp32 and q4, streamed): a draftable decoder
    and its `mtp` graph per variant."""
    return built_once(tmp_path_factory, "mtp_export", lambda root: export_onnx(
        tiny_mtp_checkpoint, root / "export", "fp32,q4", progress=False))


@pytest.fixture(scope="session")
def default_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model, fp32, with the opset-27 recurrent ops (`--recurrent-ops standard`; the packagers
    convert it); default_contrib_export is the default form."""
    return built_once(tmp_path_factory, "default", lambda root: export_onnx(
        "default", root / "export", options=OnnxOptions("standard"), progress=False))


@pytest.fixture(scope="session")
def default_contrib_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model, fp32 and q4, with the com.microsoft recurrent ops that app runtimes load."""
    return built_once(tmp_path_factory, "contrib", lambda root: export_onnx(
        "default", root / "export", "fp32,q4", OnnxOptions("contrib"), progress=False))


@pytest.fixture(scope="session")
def default_checkpoint() -> Path:
    return CHECKPOINT_DIR


ALL_SCHEMES = "fp32,fp16,q8,q4,q4f16"
DEFAULT_VARIANTS = ALL_SCHEMES + ",q4mix"  # and the mixed recipe, held to the q4 gate on the trained model


@pytest.fixture(scope="session")
def default_all_variants(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model in every scheme, written by one export call (standard ops: the Android test converts them)."""
    return built_once(tmp_path_factory, "variants", lambda root: export_onnx(
        "default", root / "export", DEFAULT_VARIANTS, OnnxOptions("standard"), progress=False))


@pytest.fixture(scope="session")
def tiny_untied_quantized(tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return built_once(tmp_path_factory, "untied", lambda root: export_onnx(
        tiny_checkpoints["kv_double_untied"], root / "export", DEFAULT_VARIANTS,
        OnnxOptions("contrib", QuantOptions(64, False, 4), all_logits=True), progress=False))


COREML_CONTEXT = 256
COREML_OPTIONS = ",".join(SCHEMES)  # every Core ML weight option


@pytest.fixture(scope="session")
def default_coreml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model as Core ML packages of every weight option, context 256; shared by the Core
    ML and ios tests (each option is held to its quality gate)."""
    from exporter.coreml.backend import CoreMLOptions, export_coreml

    return built_once(tmp_path_factory, "coreml", lambda root: export_coreml(
        "default", root / "default", COREML_OPTIONS, CoreMLOptions(context=COREML_CONTEXT), progress=False))


@pytest.fixture(scope="session")
def tiny_coreml(tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Hv = 2·Hk layout (random, untied) in every Core ML option, the delta-rule state as fp32
    input/output (--recurrent-state io); shared by the Core ML tests and the iOS bundle in genai."""
    from exporter.coreml.backend import CoreMLOptions, export_coreml

    return built_once(tmp_path_factory, "tiny-coreml", lambda root: export_coreml(
        tiny_checkpoints["kv_double_untied"], root / "tiny", COREML_OPTIONS,
        CoreMLOptions(context=COREML_CONTEXT, recurrent_state="io"), progress=False))


# A multimodal checkpoint: untied embeddings (a tied random model just repeats its last input token,
# which would make greedy agreement meaningless) and a seed under which the image changes the tokens.
VL_SEED = 5
VL_SCHEMES = "fp32,q8,q4"  # one trace; fp16 is checked on the tower alone (tests/test_vision.py)


@pytest.fixture(scope="session")
def tiny_vl_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vision_checkpoint import write_tiny_vl_checkpoint

    return built_once(tmp_path_factory, "vl", lambda root: write_tiny_vl_checkpoint(
        tiny_config(tie=False), root / "checkpoint", VL_SEED))


@pytest.fixture(scope="session")
def tiny_vl_export(tiny_vl_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The multimodal checkpoint exported with contrib ops (what every bundle carries), three variants."""
    return built_once(tmp_path_factory, "vl_export", lambda root: export_onnx(
        tiny_vl_checkpoint, root / "export", VL_SCHEMES, OnnxOptions("contrib"), progress=False))


@pytest.fixture(scope="session")
def test_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from vision_checkpoint import write_test_images

    return built_once(tmp_path_factory, "images", lambda root: write_test_images(root))
