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
converted on its own, from a skeleton decoder whose large weights are filled in one at a time as they
are compressed (exporter/coreml/skeleton.py: no float copy of the model in memory); the functions are
then saved as one package, each weight they share stored once (`skeleton.save_functions`).
"""

from __future__ import annotations

import importlib.util
import json
import uuid
from dataclasses import dataclass
from pathlib import Path


from exporter.coreml.skeleton import (SkeletonFunction, compress_function, convert_skeleton, is_coreml_placeholder,
                                      save_functions)
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
from quant.coreml_weights import family_formats
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
        self.checkpoint = checkpoint
        model = checkpoint.build_skeleton(kernels=MATMUL_ONLY, logits="last", placeholder=is_coreml_placeholder)
        return CoreMLStep(model, self.options.context, recurrent_io=self.options.recurrent_state == "io").eval()

    def prepare(self, step: CoreMLStep, activations: str, folder: Path, stages: Stages) -> Converted:
        (folder / "coreml").mkdir(exist_ok=True)
        steps = {"prefill": (step, self.options.chunk), "decode": (step, 1)}
        if self.vision is not None:
            visual = step.visual_prefill((self.vision.cfg.image_token_id, self.vision.cfg.video_token_id))
            steps[VISUAL_PREFILL] = (visual, self.options.chunk)
        converted = Converted(steps, activations, self.cfg)
        for function in steps:
            stages.run(lambda f=function: converted.convert(f))
        converted.vision = {function_name(w, h): stages.run(lambda w=w, h=h: convert_size(self.vision, w, h, activations))
                            for w, h in self.options.image_sizes}
        return converted

    def write_variant(self, converted: Converted, scheme: Scheme, folder: Path) -> dict:
        functions, compressed = {}, {}
        for name in converted.steps:
            functions[name] = converted.take(name)
            compress_function(functions[name], scheme, self.checkpoint, reuse=compressed)
        save_functions(functions, DEFAULT_FUNCTION, folder / scheme.coreml_package)
        make_reproducible(folder / scheme.coreml_package)
        functions.clear()
        compressed.clear()
        vision = converted.vision
        record = {"package": scheme.coreml_package, "compute_precision": scheme.activations, "weights": scheme.coreml,
                  "weight_bits": scheme.stored_bits}
        if scheme.weight_bits:
            record["weight_formats"] = family_formats(scheme, self.cfg)
        record["bytes_on_disk"] = files_bytes(folder, [scheme.coreml_package])
        if vision:
            package = write_vision_package(vision, scheme, self.vision.cfg, folder)
            record.update(vision_package=package, vision_bytes_on_disk=files_bytes(folder, [package]))
        return record

    def release(self, converted: Converted) -> None:
        converted.functions.clear()
        converted.vision.clear()

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


class Converted:
    """The skeleton functions of one activation dtype. Writing a variant fills a function's placeholders in
    place, so each variant after the first converts the function again (time, not memory)."""

    def __init__(self, steps: dict[str, tuple[CoreMLStep, int]], activations: str, cfg: TextConfig) -> None:
        self.steps, self.activations, self.cfg = steps, activations, cfg
        self.functions: dict[str, SkeletonFunction] = {}
        self.vision: dict = {}

    def convert(self, function: str) -> None:
        step, tokens = self.steps[function]
        self.functions[function] = convert_skeleton(step, tokens, self.activations, self.cfg)

    def take(self, function: str) -> SkeletonFunction:
        """The function's skeleton, converted anew when a variant before took it."""
        if function not in self.functions:
            self.convert(function)
        return self.functions.pop(function)


def require_coremltools(what: str) -> None:
    """A clear error where coremltools is missing (it has no wheel for Linux on ARM or Windows)."""
    if importlib.util.find_spec("coremltools") is None:
        raise QwenEdgeError(f"{what} needs coremltools, which is not installed (it ships for macOS and Linux x86_64 "
                            "only); export ONNX here, or run this on such a machine with 'pip install coremltools==9.0'")


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
