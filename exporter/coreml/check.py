"""`qwen-edge verify --format coreml`: check a Core ML export without Core ML.

On Linux a package is checked by its spec (functions, inputs, outputs, states, op types, weight
bit-widths) and by running each function's MIL program with the NumPy interpreter
(exporter/coreml/mil_interpreter.py) against the PyTorch reference: prefills of 64 and 130 tokens,
each followed by greedy decode steps, in the parity loop ONNX uses (exporter/verify/parity.py). On
macOS the same check runs the package with coremltools' own prediction (`MLModel(...,
function_name=...)`, `make_state()`), chosen with `--runner coreml`.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from default_model import resolve_checkpoint
from exporter.coreml.mil_interpreter import HANDLERS, SUPPORTED_OPS, builtin_np_dtype, run_function
from exporter.coreml.sequence import CoreMLRunner
from exporter.verify.parity import VerifyReport, prompt_ids, teacher_forced
from exporter.verify.runners import LayerwiseReference
from graphs.config import TextConfig
from graphs.errors import QwenEdgeError
from runtime_py.export_format import read_manifest, variant_record

WEIGHT_OPS = ("linear", "gather", "conv")
# Default logit tolerance relative to the logit scale, per compute precision. States are fp16 in
# every variant, so even fp32 compute is not bit-close to the fp32 reference.
DEFAULT_RTOL = {"float32": 1e-2, "float16": 5e-2}
COREML_PROMPT_LENGTHS = (64, 130)


@dataclass
class FunctionSpec:
    name: str
    inputs: dict[str, tuple[str, list[int]]]  # name -> (dtype, shape)
    outputs: dict[str, tuple[str, list[int]]]
    states: dict[str, tuple[str, list[int]]]
    op_types: dict[str, int] = field(default_factory=dict)
    weight_bits: dict[str, int] = field(default_factory=dict)  # "int4" -> number of weight tensors


@dataclass
class PackageSpec:
    path: str
    default_function: str
    functions: dict[str, FunctionSpec]
    weight_files: list[str]

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def _dtype_name(var: object) -> str:
    from coremltools.converters.mil.mil import types

    return types.builtin_to_string(var.dtype)


def input_type(var: object) -> tuple[object, tuple[int, ...]]:
    """(element builtin type, shape) of a function input, a state input unwrapped."""
    from coremltools.converters.mil.mil import types

    tensor = var.sym_type.wrapped_type() if types.is_state(var.sym_type) else var.sym_type
    return tensor.get_primitive(), tuple(int(d) for d in tensor.get_shape())


def load_program(package: Path):  # noqa: ANN201
    """(spec, pymil Program) of a saved .mlpackage, weights read from its blob file."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    package = Path(package)
    if not (package / "Manifest.json").is_file():
        raise QwenEdgeError(f"{package}: not an .mlpackage (no Manifest.json); export with --format coreml")
    spec = ct.utils.load_spec(str(package))
    if spec.WhichOneof("Type") != "mlProgram":
        raise QwenEdgeError(f"{package}: not an mlprogram package")
    weights = package / "Data" / "com.apple.CoreML" / "weights"
    return spec, load(spec, spec.specificationVersion, str(weights))


def _weight_width(var: object) -> str | None:
    """Storage type of the weight feeding an op: a const's dtype or a constexpr's compressed data."""
    producer = var.op
    if producer is None:
        return None
    if producer.op_type == "const":
        return _dtype_name(var) if var.val is not None and np.ndim(var.val) >= 2 else None
    if producer.op_type == "constexpr_blockwise_shift_scale":
        return _dtype_name(producer.inputs["data"])
    if producer.op_type == "constexpr_lut_to_dense":
        return "lut-" + _dtype_name(producer.inputs["indices"])
    if producer.op_type == "constexpr_affine_dequantize":
        return _dtype_name(producer.inputs["quantized_data"])
    return None


def read_package_spec(package: Path) -> PackageSpec:
    from coremltools.converters.mil.mil import types

    spec, program = load_program(package)
    functions = {}
    for fn in spec.description.functions:
        mil = program.functions[fn.name]
        var_info = {}
        for name, var in mil.inputs.items():
            dtype, shape = input_type(var)
            var_info[name] = (types.builtin_to_string(dtype), list(shape))
        states = {s.name: var_info[s.name] for s in fn.state}
        inputs = {i.name: var_info[i.name] for i in fn.input}
        outputs = {v.name: (_dtype_name(v), list(v.shape)) for v in mil.outputs}
        ops = Counter(op.op_type for op in mil.operations)
        widths: Counter[str] = Counter()
        for op in mil.operations:
            if op.op_type in WEIGHT_OPS:
                weight = op.inputs.get("x") if op.op_type == "gather" else op.inputs.get("weight")
                width = _weight_width(weight) if weight is not None else None
                if width:
                    widths[width] += 1
        functions[fn.name] = FunctionSpec(fn.name, inputs, outputs, states, dict(sorted(ops.items())), dict(widths))
    weight_files = sorted(str(p.relative_to(package)) for p in Path(package).rglob("*.bin"))
    return PackageSpec(str(package), spec.description.defaultFunctionName, functions, weight_files)


def stored_weights(package: Path, cfg: TextConfig, function: str = "decode") -> dict[str, np.ndarray]:
    """{decoder parameter: weight} of every compressed weight a function reads, decoded as Core ML
    decodes it (the interpreter's constexpr handlers): what the package really computes with."""
    from quant.coreml_weights import param_of_constant

    _, program = load_program(package)
    weights = {}
    for op in program.functions[function].operations:
        if op.op_type.startswith("constexpr_") and (param := param_of_constant(op.name, cfg)) is not None:
            args = {k: v.val for k, v in op.inputs.items()}
            weights[param] = np.asarray(HANDLERS[op.op_type](args))
    return weights


def unsupported_ops(package_spec: PackageSpec) -> list[str]:
    return sorted({op for f in package_spec.functions.values() for op in f.op_types if op not in SUPPORTED_OPS})


class InterpretedPackage:
    """The package's functions run by the NumPy MIL interpreter, states shared between them."""

    def __init__(self, package: Path) -> None:
        spec, self.program = load_program(package)
        missing = unsupported_ops(read_package_spec(package))
        if missing:
            raise QwenEdgeError(f"{package}: MIL op type(s) {', '.join(missing)} not implemented by the interpreter; "
                                "add them to exporter/coreml/mil_interpreter.py")
        self.state_vars = {s.name: None for fn in spec.description.functions for s in fn.state}
        self.constants: dict[int, np.ndarray] = {}
        self.states: dict[str, np.ndarray] = {}

    def reset(self) -> None:
        """Fresh zero states: a new sequence."""
        self.states = {}
        for fn in self.program.functions.values():
            for name, var in fn.inputs.items():
                if name in self.state_vars:
                    dtype, shape = input_type(var)
                    self.states[name] = np.zeros(shape, builtin_np_dtype(dtype))

    def call(self, function: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return run_function(self.program.functions[function], feeds, self.states, self.constants)


class CoreMLPredictor:
    """macOS only: the package run by Core ML itself through coremltools."""

    def __init__(self, package: Path) -> None:
        if sys.platform != "darwin":
            raise QwenEdgeError("--runner coreml needs macOS 15+ (Core ML); on Linux use the default --runner mil")
        import coremltools as ct

        functions = [f.name for f in ct.utils.load_spec(str(package)).description.functions]  # prefill_visual too
        self.models = {f: ct.models.MLModel(str(package), function_name=f) for f in functions}
        self.state = None

    def reset(self) -> None:
        self.state = self.models["decode"].make_state()

    def call(self, function: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.models[function].predict(feeds, state=self.state)


def coreml_runner(export_dir: Path, variant: str, runner: str = "mil") -> CoreMLRunner:
    """One Core ML variant of an export as a sequence runner (exporter/verify/runners.py): its package
    run by the NumPy MIL interpreter ("mil") or by Core ML ("coreml", macOS), driven as an app drives it."""
    manifest = read_manifest(export_dir)
    if manifest.get("format") != "coreml":
        raise QwenEdgeError(f"{export_dir}: not a Core ML export (format {manifest.get('format')!r}); "
                            "export with --format coreml")
    package = Path(export_dir) / variant_record(export_dir, variant)["package"]
    target = InterpretedPackage(package) if runner == "mil" else CoreMLPredictor(package)
    inputs = manifest["functions"]["decode"]["inputs"]
    io_shape = tuple(inputs["recurrent_in"]) if manifest["recurrent_state"] == "io" else None
    return CoreMLRunner(target.call, target.reset, manifest["prefill_chunk"], manifest["context_capacity"], io_shape)


def verify_coreml(checkpoint: str | Path, export_dir: Path, variant: str = "fp32",
                  prompt_lengths: tuple[int, ...] = COREML_PROMPT_LENGTHS, decode_steps: int = 32,
                  rtol: float | None = None, runner: str = "mil") -> tuple[VerifyReport, PackageSpec]:
    """Parity of one Core ML variant against the PyTorch reference (exporter/verify/parity.py)."""
    from graphs.checkpoint import open_checkpoint
    from quant.dequantized import FLOAT_REFERENCE, StoredWeightsCheckpoint

    target = coreml_runner(export_dir, variant, runner)
    record = variant_record(export_dir, variant)
    package_spec = read_package_spec(Path(export_dir) / record["package"])
    if rtol is None:
        rtol = DEFAULT_RTOL[record["compute_precision"]]
    ck = open_checkpoint(resolve_checkpoint(checkpoint))
    prompts = [prompt_ids(length, ck.config.vocab_size, seed=n) for n, length in enumerate(prompt_lengths)]
    reference, described = ck, FLOAT_REFERENCE
    if record["weights"] != "float":  # the package's own decoded weights: the check is of the program
        stored = stored_weights(Path(export_dir) / record["package"], ck.config)
        reference = StoredWeightsCheckpoint(ck, stored, record["compute_precision"] == "float16")
        described = f"the checkpoint's weights as {variant} stores them ({record['weights']}, decoded from the package)"
    reports = teacher_forced(LayerwiseReference(reference), target, prompts, decode_steps, rtol)
    return VerifyReport(str(checkpoint), str(export_dir), rtol, decode_steps, reports, described), package_spec


def format_package_spec(spec: PackageSpec) -> str:
    lines = [f"package {spec.path} (default function {spec.default_function})"]
    for fn in spec.functions.values():
        ins = ", ".join(f"{k} {d}{s}" for k, (d, s) in fn.inputs.items())
        outs = ", ".join(f"{k} {d}{s}" for k, (d, s) in fn.outputs.items())
        lines.append(f"  {fn.name}: inputs {ins}; outputs {outs}; {len(fn.states)} states "
                     f"({', '.join(sorted({d for d, _ in fn.states.values()}))}); {sum(fn.op_types.values())} ops "
                     f"of {len(fn.op_types)} types; weights {fn.weight_bits}")
    return "\n".join(lines)
