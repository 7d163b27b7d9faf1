"""The Core ML side of `qwen-edge export` (exporter/pipeline.py): a stateful multifunction .mlpackage per scheme.

Output layout:
    OUT/coreml/model{suffix}.mlpackage   functions `prefill` (chunk tokens) and `decode` (1 token),
                                         with --image-sizes also `prefill_visual` (chunk tokens,
                                         3-row positions, image features in: graphs/coreml_step.py),
                                         one copy of the weights, states per layer (fp16)
    OUT/coreml/vision_encoder{suffix}.mlpackage   with --image-sizes: one function per image size
                                         (exporter/coreml/vision.py)
    OUT/qwen_edge.json                   format "coreml": chunk, capacity, state mode, I/O, variants

Each function is the eager `graphs.coreml_step.CoreMLStep` exported with `torch.export` (static
shapes: the cache write is a slice at a run-time start, which Core ML maps to `slice_update`) and
converted on its own; `ct.utils.save_multifunction` then merges the two, keeping identical weights
once.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from exporter.coreml.vision import check_image_sizes, convert_size, function_name, write_vision_package
from exporter.coreml.vision import io_record as vision_io_record
from exporter.pipeline import files_bytes
from exporter.progress import Stages
from graphs.checkpoint import Checkpoint
from graphs.config import TextConfig
from graphs.coreml_step import CoreMLStep
from graphs.errors import QwenEdgeError
from graphs.recurrent_ops import MATMUL_ONLY
from graphs.state import state_tensors
from graphs.vision import VisionEncoder
from quant.coreml_weights import compress_weights, family_formats
from quant.schemes import Scheme
from runtime_py.export_format import COREML_MIN_DEPLOYMENT

RECURRENT_MODES = ("state", "io")
FUNCTIONS = ("prefill", "decode")
VISUAL_PREFILL = "prefill_visual"  # the prefill of an image or video prompt (exports with --image-sizes)
DEFAULT_FUNCTION = "decode"


@dataclass(frozen=True)
class CoreMLOptions:
    """Core ML-only export options."""

    chunk: int = 64  # tokens per prefill call
    context: int = 4096  # KV-cache capacity, a multiple of the chunk
    recurrent_state: str = "state"  # "state": fp16 Core ML state; "io": fp32 input/output the app carries
    image_sizes: tuple[tuple[int, int], ...] = ()  # (width, height) of each vision function; () = no vision

    def __post_init__(self) -> None:
        if self.chunk < 1 or self.context < 1:
            raise QwenEdgeError(f"--chunk {self.chunk} and --context {self.context} must be positive")
        if self.context % self.chunk:
            raise QwenEdgeError(f"--chunk {self.chunk} does not divide --context {self.context}; pick a context that "
                                f"is a multiple of the chunk, e.g. {self.context - self.context % self.chunk or self.chunk}")
        if self.recurrent_state not in RECURRENT_MODES:
            raise QwenEdgeError(f"--recurrent-state {self.recurrent_state!r} is not a mode; "
                                f"use one of {', '.join(RECURRENT_MODES)}")


class CoreMLBackend:
    format = "coreml"
    wants_mtp = False  # the MTP head is not converted to Core ML (yet)

    def __init__(self, options: CoreMLOptions = CoreMLOptions()) -> None:
        self.options = options
        self.cfg: TextConfig | None = None
        self.vision: VisionEncoder | None = None

    def check(self, schemes: tuple[Scheme, ...]) -> None:
        """Every scheme has a Core ML form; coremltools must be installed."""
        require_coremltools("--format coreml")

    def check_config(self, cfg: TextConfig) -> None:
        """The KV-cache capacity is allocated in full: no more than the model's context."""
        if self.options.context > cfg.max_position_embeddings:
            raise QwenEdgeError(f"--context {self.options.context} is longer than the model's context "
                                f"({cfg.max_position_embeddings:,} positions, config.json max_position_embeddings); "
                                "pass a smaller --context")

    def prepare_stages(self, activations: str) -> list[str]:
        sizes = [f"convert vision {w}x{h} ({activations})" for w, h in self.options.image_sizes]
        visual = [f"convert {VISUAL_PREFILL} ({activations})"] if self.options.image_sizes else []
        return [f"convert {f} ({activations})" for f in FUNCTIONS] + visual + sizes

    def finish_stages(self) -> list[str]:
        return []

    def finish(self, folder: Path, stages: Stages) -> None:
        """Every package is complete when written."""

    def load(self, checkpoint: Checkpoint) -> CoreMLStep:
        self.cfg = checkpoint.config
        if self.options.image_sizes:
            if checkpoint.vision is None:
                raise QwenEdgeError(f"{checkpoint.folder}: --image-sizes needs a checkpoint with a vision tower "
                                    "(model.visual.* weights); this one is text-only")
            check_image_sizes(self.options.image_sizes, checkpoint.vision)
            self.vision = checkpoint.build_vision_encoder()
        model = checkpoint.build_decoder(kernels=MATMUL_ONLY, logits="last")
        return CoreMLStep(model, self.options.context, recurrent_io=self.options.recurrent_state == "io").eval()

    def prepare(self, step: CoreMLStep, activations: str, folder: Path, stages: Stages) -> dict:
        (folder / "coreml").mkdir(exist_ok=True)
        tokens = {"prefill": self.options.chunk, "decode": 1}
        converted = {f: stages.run(lambda f=f: convert_function(step, tokens[f], activations)) for f in FUNCTIONS}
        if self.vision is not None:
            visual = step.visual_prefill((self.vision.cfg.image_token_id, self.vision.cfg.video_token_id))
            converted[VISUAL_PREFILL] = stages.run(lambda: convert_function(visual, self.options.chunk, activations))
        converted["vision"] = {function_name(w, h): stages.run(lambda w=w, h=h: convert_size(self.vision, w, h, activations))
                               for w, h in self.options.image_sizes}
        return converted

    def write_variant(self, converted: dict, scheme: Scheme, folder: Path) -> dict:
        parts_dir = folder / f".parts{scheme.suffix}"
        parts_dir.mkdir()
        parts = {}
        vision = converted.pop("vision", {})
        for function, mlmodel in converted.items():
            parts[function] = parts_dir / f"{function}.mlpackage"
            compress_weights(mlmodel, scheme, self.cfg).save(str(parts[function]))
        merge_functions(parts, folder / scheme.coreml_package)
        shutil.rmtree(parts_dir)
        converted["vision"] = vision
        record = {"package": scheme.coreml_package, "compute_precision": scheme.activations, "weights": scheme.coreml,
                  "weight_bits": scheme.stored_bits}
        if scheme.weight_bits:
            record["weight_formats"] = family_formats(scheme, self.cfg)
        record["bytes_on_disk"] = files_bytes(folder, [scheme.coreml_package])
        if vision:
            package = write_vision_package(vision, scheme, self.vision.cfg, folder)
            record.update(vision_package=package, vision_bytes_on_disk=files_bytes(folder, [package]))
        return record

    def release(self, converted: dict) -> None:
        converted.clear()

    def manifest_fields(self, cfg: TextConfig) -> dict:
        o = self.options
        return {
            "minimum_deployment_target": COREML_MIN_DEPLOYMENT,
            "prefill_chunk": o.chunk,
            "context_capacity": o.context,
            "recurrent_state": o.recurrent_state,
            "state_dtype": "float16",
            "padding": "start of the first prefill chunk: token 0, position_id -1",
            "default_function": DEFAULT_FUNCTION,
            **io_record(cfg, o, visual=self.vision is not None),
            **({"vision": vision_io_record(o.image_sizes, self.vision.cfg)} if self.vision is not None else {}),
        }


def require_coremltools(what: str) -> None:
    """A clear error where coremltools is missing (it has no wheel for Linux on ARM or Windows)."""
    if importlib.util.find_spec("coremltools") is None:
        raise QwenEdgeError(f"{what} needs coremltools, which is not installed (it ships for macOS and Linux x86_64 "
                            "only); export ONNX here, or run this on such a machine with 'pip install coremltools==9.0'")


def _example_inputs(tokens: int, step: CoreMLStep) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """(positional, keyword) example inputs; the image features go by keyword so that no None takes a place."""
    positions = torch.arange(tokens, dtype=torch.int32)[None]
    if step.visual_tokens:
        positions = positions[None].expand(3, -1, -1).contiguous()
    inputs = (torch.zeros(1, tokens, dtype=torch.int32), positions,
              torch.zeros(1, 1, tokens, step.capacity), torch.zeros(1, dtype=torch.int32))
    if step.recurrent_io:
        inputs += (torch.zeros(step.recurrent_io_shape()),)
    extra = {"image_features": torch.zeros(1, tokens, step.model.cfg.hidden_size)} if step.visual_tokens else {}
    return inputs, extra


def convert_function(step: CoreMLStep, tokens: int, compute: str):  # noqa: ANN201
    """One function (T = tokens) as a Core ML mlprogram (not loaded: this may be Linux)."""
    import coremltools as ct

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args, kwargs = _example_inputs(tokens, step)
        program = torch.export.export(step, args, kwargs, strict=False)
        program = program.run_decompositions({})
    # fp32 outputs in every variant: an fp16 program casts at the end, so the carried state and the
    # logits keep one dtype across variants
    outputs = [ct.TensorType(name="logits", dtype=np.float32)]
    if step.recurrent_io:
        outputs.append(ct.TensorType(name="recurrent_out", dtype=np.float32))
    precision = ct.precision.FLOAT32
    if compute == "float16":
        precision = ct.transform.FP16ComputePrecision(op_selector=lambda op: not in_norm_statistic(op))
    return ct.convert(program, outputs=outputs, minimum_deployment_target=ct.target.iOS18,
                      compute_precision=precision, convert_to="mlprogram", skip_model_load=True)


# Ops that may carry a norm's sum of squares: from a square through its reduction, + eps and rsqrt.
_STATISTIC_OPS = ("reduce_mean", "reduce_sum", "add", "rsqrt", "sqrt", "real_div")


def in_norm_statistic(op) -> bool:  # noqa: ANN001
    """Is this op part of a norm's sum of squares (x², its mean or sum, + eps, rsqrt)? Those stay fp32
    in fp16-compute packages: x² overflows fp16 above |x| = 256, and the default model's final norm
    already sees |x| = 316 (real checkpoints more), which turned its output to zero. The decoder
    computes its norms in fp32; coremltools' fp16 pass would otherwise drop those casts."""
    kind = op.op_type
    if kind == "pow" or (kind == "mul" and op.inputs.get("x") is op.inputs.get("y")):
        return True
    if kind not in _STATISTIC_OPS:
        return False
    return any(getattr(v, "op", None) is not None and in_norm_statistic(v.op) for v in op.inputs.values())


def merge_functions(parts: dict[str, Path], out: Path) -> None:
    """Save the per-function packages as one multifunction package; shared weights stored once."""
    import coremltools as ct

    desc = ct.utils.MultiFunctionDescriptor()
    for name, path in parts.items():
        desc.add_function(str(path), src_function_name="main", target_function_name=name)
    desc.default_function_name = DEFAULT_FUNCTION
    ct.utils.save_multifunction(desc, str(out))
    make_reproducible(out)


def make_reproducible(package: Path) -> None:
    """Give a saved package the same bytes on every export of the same checkpoint. coremltools names the
    package's items (model spec, weights folder) by random UUIDs in Manifest.json: they are named by
    their paths instead (UUID version 5; only keys within the package). And it serializes the spec's
    protobuf maps (the functions, metadata) in arbitrary order: the spec is rewritten with sorted maps."""
    from coremltools.proto import Model_pb2

    path = package / "Manifest.json"
    manifest = json.loads(path.read_text())
    entries, root = manifest["itemInfoEntries"], manifest["rootModelIdentifier"]
    renamed = {old: str(uuid.uuid5(uuid.NAMESPACE_URL, f"qwen-edge:{item['path']}")) for old, item in entries.items()}
    manifest["itemInfoEntries"] = {renamed[old]: item for old, item in entries.items()}
    manifest["rootModelIdentifier"] = renamed[root]
    path.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n")
    spec_path = package / "Data" / entries[root]["path"]
    spec = Model_pb2.Model.FromString(spec_path.read_bytes())
    spec_path.write_bytes(spec.SerializeToString(deterministic=True))


def io_record(cfg: TextConfig, options: CoreMLOptions, visual: bool = False) -> dict:
    """The package's inputs, outputs and states per function, as the manifest states them."""
    recurrent_io = options.recurrent_state == "io"
    tensors = state_tensors(cfg)
    states = {t.coreml_name: list(t.shape(1, options.context)) for t in tensors
              if not (recurrent_io and t.role.role == "recurrent")}
    recurrent = [t for t in tensors if t.role.role == "recurrent"]
    functions = {}
    calls = (("prefill", options.chunk), ("decode", 1)) + (((VISUAL_PREFILL, options.chunk),) if visual else ())
    for name, t in calls:
        positions = [3, 1, t] if name == VISUAL_PREFILL else [1, t]
        inputs = {"input_ids": [1, t], "position_ids": positions, "attention_mask": [1, 1, t, options.context],
                  "write_position": [1]}
        outputs = {"logits": [1, 1, cfg.vocab_size]}
        if recurrent_io:
            inputs["recurrent_in"] = outputs["recurrent_out"] = [len(recurrent), *recurrent[0].shape(1)[1:]]
        if name == VISUAL_PREFILL:
            inputs["image_features"] = [1, t, cfg.hidden_size]
        functions[name] = {"inputs": inputs, "outputs": outputs}
    return {"functions": functions, "states": states}


def export_coreml(checkpoint: str | Path, out: Path, schemes: str = "fp32", options: CoreMLOptions = CoreMLOptions(), *,
                  force: bool = False, progress: bool = True) -> Path:
    """`qwen-edge export --format coreml CHECKPOINT OUT --quant SCHEMES` from Python."""
    from exporter.pipeline import ExportRequest, run_export
    from quant.schemes import parse_schemes

    return run_export(ExportRequest(checkpoint, out, tuple(parse_schemes(schemes, "coreml")), force, progress),
                      CoreMLBackend(options))
