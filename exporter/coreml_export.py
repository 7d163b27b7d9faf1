"""`qwen-edge export --format coreml`: a stateful multifunction .mlpackage per weight option.

Output layout:
    OUT/coreml/model{suffix}.mlpackage   functions `prefill` (chunk tokens) and `decode` (1 token),
                                         one copy of the weights, states per layer (fp16)
    OUT/config.json, tokenizer files     as for ONNX
    OUT/qwen_edge.json                   format "coreml": chunk, capacity, state mode, I/O, variants

Each function is the eager `graphs.coreml_step.CoreMLStep` exported with `torch.export` (static
shapes: the cache write is a slice at a run-time start, which Core ML maps to `slice_update`) and
converted on its own; `ct.utils.save_multifunction` then merges the two, keeping identical weights
once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from exporter.atomic import atomic_output_dir, check_destination
from exporter.export import Stages, _copy_support_files, qwen_edge_version, resolve_checkpoint
from graphs.checkpoint import open_checkpoint
from graphs.config import TextConfig
from graphs.coreml_step import CoreMLStep
from graphs.errors import QwenEdgeError
from quant.coreml_weights import COREML_SCHEMES, CoreMLScheme, compress_weights
from runtime_py.session import MANIFEST

RECURRENT_MODES = ("state", "io")
DEFAULT_RECURRENT_MODE = "state"
FUNCTIONS = ("prefill", "decode")
DEFAULT_FUNCTION = "decode"
MIN_DEPLOYMENT = "iOS18 / macOS15"


def package_name(scheme: CoreMLScheme) -> str:
    return f"coreml/model{scheme.suffix}.mlpackage"


def check_options(chunk: int, capacity: int, recurrent_mode: str) -> None:
    if chunk < 1 or capacity < 1:
        raise QwenEdgeError(f"--chunk {chunk} and --context {capacity} must be positive")
    if capacity % chunk:
        raise QwenEdgeError(f"--chunk {chunk} does not divide --context {capacity}; "
                            f"pick a context that is a multiple of the chunk, e.g. {capacity - capacity % chunk or chunk}")
    if recurrent_mode not in RECURRENT_MODES:
        raise QwenEdgeError(f"--recurrent-state {recurrent_mode!r} is not a mode; use one of {', '.join(RECURRENT_MODES)}")


def _example_inputs(tokens: int, capacity: int, step: CoreMLStep) -> tuple[torch.Tensor, ...]:
    inputs = (torch.zeros(1, tokens, dtype=torch.int32), torch.arange(tokens, dtype=torch.int32)[None],
              torch.zeros(1, 1, tokens, capacity), torch.zeros(1, dtype=torch.int32))
    if step.recurrent_io:
        inputs += (torch.zeros(step.recurrent_io_shape()),)
    return inputs


def convert_function(step: CoreMLStep, tokens: int, compute: str):  # noqa: ANN201
    """One function (T = tokens) as a Core ML mlprogram (not loaded: this may be Linux)."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # coremltools' pass-by-pass bars; our Stages bar reports progress
    import coremltools as ct

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(step, _example_inputs(tokens, step.capacity, step), strict=False)
        program = program.run_decompositions({})
    # fp32 outputs in every variant: an fp16 program casts at the end, so the carried state and the
    # logits keep one dtype across variants
    outputs = [ct.TensorType(name="logits", dtype=np.float32)]
    if step.recurrent_io:
        outputs.append(ct.TensorType(name="recurrent_out", dtype=np.float32))
    precision = ct.precision.FLOAT16 if compute == "float16" else ct.precision.FLOAT32
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    return ct.convert(program, outputs=outputs, minimum_deployment_target=ct.target.iOS18,
                      compute_precision=precision, convert_to="mlprogram", skip_model_load=True)


def merge_functions(parts: dict[str, Path], out: Path) -> None:
    """Save the per-function packages as one multifunction package; shared weights stored once."""
    import coremltools as ct

    desc = ct.utils.MultiFunctionDescriptor()
    for name, path in parts.items():
        desc.add_function(str(path), src_function_name="main", target_function_name=name)
    desc.default_function_name = DEFAULT_FUNCTION
    ct.utils.save_multifunction(desc, str(out))


def io_record(cfg: TextConfig, chunk: int, capacity: int, recurrent_mode: str) -> dict:
    """The package's inputs, outputs and states per function, as the manifest states them."""
    hv, dk, dv = cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    shapes = {}
    for i, layer_type in enumerate(cfg.layer_types):
        if layer_type == "linear_attention":
            shapes[f"conv_{i}"] = [1, cfg.conv_dim, cfg.linear_conv_kernel_dim - 1]
            if recurrent_mode == "state":
                shapes[f"recurrent_{i}"] = [1, hv, dk, dv]
        else:
            shapes[f"key_{i}"] = shapes[f"value_{i}"] = [1, cfg.num_key_value_heads, capacity, cfg.head_dim]
    functions = {}
    for name, t in (("prefill", chunk), ("decode", 1)):
        inputs = {"input_ids": [1, t], "position_ids": [1, t], "attention_mask": [1, 1, t, capacity],
                  "write_position": [1]}
        outputs = {"logits": [1, 1, cfg.vocab_size]}
        if recurrent_mode == "io":
            inputs["recurrent_in"] = outputs["recurrent_out"] = [len(cfg.linear_layers), hv, dk, dv]
        functions[name] = {"inputs": inputs, "outputs": outputs}
    return {"functions": functions, "states": shapes}


def export_coreml(
    checkpoint: str | Path,
    out: Path,
    *,
    schemes: list[CoreMLScheme] | None = None,
    chunk: int = 64,
    capacity: int = 4096,
    recurrent_mode: str = DEFAULT_RECURRENT_MODE,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Export `checkpoint` to Core ML packages in `out` (atomically). Returns `out`."""
    check_options(chunk, capacity, recurrent_mode)
    schemes = schemes or [COREML_SCHEMES["fp32"]]
    folder = resolve_checkpoint(checkpoint)
    out = Path(out)
    check_destination(out, force)
    computes = list(dict.fromkeys(s.compute for s in schemes))
    names = ["check checkpoint", "load weights"]
    for compute in computes:
        names += [f"convert {f} ({compute})" for f in FUNCTIONS]
        names += [f"write {s.name}" for s in schemes if s.compute == compute]
    stages = Stages([*names, "copy tokenizer"], progress)
    ck = stages.run(lambda: open_checkpoint(folder))
    with atomic_output_dir(out, force) as tmp:
        (tmp / "coreml").mkdir()
        model = stages.run(ck.build_decoder)
        step = CoreMLStep(model, capacity, recurrent_io=recurrent_mode == "io").eval()
        variants = {}
        for compute in computes:
            converted = {f: stages.run(lambda t=t: convert_function(step, t, compute))
                         for f, t in (("prefill", chunk), ("decode", 1))}
            for scheme in (s for s in schemes if s.compute == compute):
                stages.run(lambda s=scheme: _write_package(converted, s, ck.config, tmp))
                variants[scheme.name] = _variant_record(scheme, tmp)
        copied = stages.run(lambda: _copy_support_files(folder, tmp))
        manifest = {
            "qwen_edge_version": qwen_edge_version(),
            "format": "coreml",
            "source_checkpoint": folder.resolve().name,
            "minimum_deployment_target": MIN_DEPLOYMENT,
            "prefill_chunk": chunk,
            "context_capacity": capacity,
            "recurrent_state": recurrent_mode,
            "state_dtype": "float16",
            "padding": "start of the first prefill chunk: token 0, position_id -1",
            "default_function": DEFAULT_FUNCTION,
            **io_record(ck.config, chunk, capacity, recurrent_mode),
            "variants": variants,
            "support_files": copied,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def _write_package(converted: dict, scheme: CoreMLScheme, cfg: TextConfig, root: Path) -> None:
    parts_dir = root / f".parts{scheme.suffix}"
    parts_dir.mkdir()
    parts = {}
    for function, mlmodel in converted.items():
        parts[function] = parts_dir / f"{function}.mlpackage"
        compress_weights(mlmodel, scheme, cfg).save(str(parts[function]))
    merge_functions(parts, root / package_name(scheme))
    shutil.rmtree(parts_dir)


def _variant_record(scheme: CoreMLScheme, root: Path) -> dict:
    path = root / package_name(scheme)
    return {"package": package_name(scheme), "compute_precision": scheme.compute, "weights": scheme.weights,
            "weight_bits": scheme.bits, "bytes_on_disk": sum(f.stat().st_size for f in path.rglob("*") if f.is_file())}

