"""Core ML conversion in bounded memory: convert a skeleton, then put the real weights in one at a time.

A converted program's structure does not depend on the weights' values, so each function is traced
and converted from a skeleton decoder (`Checkpoint.build_skeleton`) whose compressible matrices (the
embedding, the LM head and the large projections, `quant.schemes.is_compressed`) are zero-stride
placeholders: every shape, no memory. Smaller tensors (norms, conv, A_log, dt_bias, in_proj_a/b) hold
their real values, so whatever the converter folds from them (1 + w of a norm, a linear's bias) is
right. Then the compression pass (`quant.coreml_weights.compression_pass`) visits the placeholders one
by one: each is read from the checkpoint, replaced in the program and compressed, and its float values
freed, before the next is read; the functions of a variant share each compressed weight. Peak memory is
the converter's own, the compressed weights (coremltools holds one byte per int4 value) and about one
float weight, not the model (BENCHMARKS "Core ML conversion": 0.8B q4 12,180 MiB before, 3,660 MiB now).

Two guards keep it exact. coremltools' `const_deduplication` would merge equal placeholders, so it is
left out of the conversion (identical weights across functions are still stored once, on real values,
by `share_weights` when the functions are saved as one package). And every placeholder must reach the
program as a constant of its own parameter's name and shape: if a converter pass had folded one into
another constant, its zeros would be wrong, so that stops the export with an error rather than writing it.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from graphs.checkpoint import Checkpoint, is_placeholder
from graphs.config import TextConfig
from graphs.coreml_step import CoreMLStep
from quant.coreml_weights import chosen_formats, compression_pass, lifted_shapes, provenance, weight_constants
from quant.schemes import Scheme, is_compressed


def is_coreml_placeholder(name: str, shape: tuple[int, ...]) -> bool:
    """A skeleton parameter for Core ML: a large matrix that a scheme may compress."""
    return is_placeholder(name, shape) and is_compressed(name)


@dataclass
class SkeletonFunction:
    """One converted function whose weight constants are placeholders (not yet written anywhere)."""

    program: object  # the coremltools MIL program
    description: object  # the converted model's spec description: inputs, outputs, states
    spec_version: int
    compute_unit: object
    constants: dict[str, str]  # const op name -> decoder parameter, of every weight constant
    placeholders: dict[str, str]  # those of them that hold placeholders


def convert_skeleton(step: CoreMLStep, tokens: int, compute: str, cfg: TextConfig) -> SkeletonFunction:
    """Convert one function of a skeleton step, its placeholders kept apart and found by name."""
    fresh_names()
    mlmodel = convert_function(step, tokens, compute, deduplicate=False)
    wanted = {name for name, shape in lifted_shapes(cfg).items() if is_coreml_placeholder(name, shape)}
    if cfg.tie_word_embeddings:
        wanted = {"lm_head.weight" if n == "embed_tokens.weight" else n for n in wanted}  # lifted once, as the head
    constants = weight_constants(mlmodel, cfg)
    placeholders = {const: param for const, param in constants.items() if param in wanted}
    missing = sorted(wanted - set(placeholders.values()))
    if missing:
        raise RuntimeError(f"Core ML conversion folded placeholder weight {missing[0]} ({len(missing)} such) into "
                           "another constant; the skeleton conversion cannot fill it (a coremltools change?)")
    program = mlmodel._mil_program
    for function in program.functions.values():  # an fp16 program holds its placeholders cast (materialized)
        for op in list(function.operations):
            if op.name in placeholders and 0 not in op.outputs[0].val.strides:
                value = op.outputs[0].val
                replace_const(op, np.broadcast_to(np.zeros((), value.dtype), value.shape))
    spec = mlmodel.get_spec()
    return SkeletonFunction(program, spec.description, spec.specificationVersion, mlmodel.compute_unit, constants,
                            placeholders)


def fresh_names() -> None:
    """Restart the MIL builder's op-name counters. They are process-wide, so without this a function's
    generated names (and the package's bytes) would depend on what was converted before it in the
    process: a variant written second, converted anew, would differ from the same variant written alone."""
    from coremltools.converters.mil import Builder

    Builder.name_count.clear()


def replace_const(op, value: np.ndarray):  # noqa: ANN001, ANN201
    """Put a const op's value in place: a new const of the same name, shape and dtype takes its uses."""
    from coremltools.converters.mil import Builder as mb

    old, block, name = op.outputs[0], op.enclosing_block, op.name
    if value.shape != tuple(old.shape) or value.dtype != old.val.dtype:
        raise RuntimeError(f"{name}: the converted constant is {old.val.dtype}{list(old.shape)}, "
                           f"its weight {value.dtype}{list(value.shape)}; the skeleton conversion cannot fill it")
    with block, mb.scope(*provenance(op)):
        new = mb.const(val=value, before_op=op, name=name + "__filled")
    block.replace_uses_of_var_after_op(anchor_op=op, old_var=old, new_var=new, no_check_var_types=True)
    block.remove_ops([op])
    new.op.name = new.name = name  # the compression and the package reader find weights by name
    return new.op


def compress_function(function: SkeletonFunction, scheme: Scheme, checkpoint: Checkpoint,
                      reuse: dict[str, object] | None = None) -> None:
    """Fill and compress one skeleton function's weights in place, as the scheme says (the function is
    used up), then run coremltools' default and backend passes on it, as a conversion would: the constant
    deduplication left out of the conversion runs here, on real values. Functions of one variant pass
    the same `reuse` dict: each weight is then read and rounded once (`compression_pass`)."""
    from coremltools.converters.mil.converter import _construct_other_pipelines
    from coremltools.converters.mil.mil.passes.pass_pipeline import PassPipeline, PassPipelineManager

    def fill(op):  # noqa: ANN001, ANN202
        param = function.placeholders.get(op.name)
        if param is None:
            return op
        return replace_const(op, checkpoint.read_rows(param).astype(op.outputs[0].val.dtype, copy=False))

    chosen = chosen_formats(scheme, function.constants, checkpoint.config) if scheme.coreml != "float" else {}
    fresh_names()
    compression_pass(scheme, chosen, fill, reuse).apply(function.program)
    main = PassPipeline.DEFAULT
    main.remove_passes({"common::add_fp16_cast", "common::add_int16_cast"})  # compute precision is set already
    _, backend = _construct_other_pipelines(main, "milinternal", "mlprogram")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for pipeline in (main, backend):
            PassPipelineManager.apply_pipeline(function.program, pipeline)


def share_weights(program) -> None:  # noqa: ANN001
    """Give every constant that several functions hold the same weight id, so the package stores it once.

    coremltools' own pass (`const_deduplication` across functions) compares candidates with np.allclose,
    which widens both to float64: on the 0.8B q4 the peak rose from 4,649 to 8,542 MiB inside it. Equal bytes
    are what sharing needs, so constants are grouped by type, shape and a digest of their bytes instead."""
    groups: dict[tuple, list] = defaultdict(list)
    for function in program.functions.values():
        for op in function.operations:
            value = op.outputs[0].val if op.op_type == "const" else None
            if isinstance(value, np.ndarray):
                digest = hashlib.blake2b(np.ascontiguousarray(value).view(np.uint8), digest_size=16).digest()
                groups[(str(op.outputs[0].sym_type), value.shape, digest)].append(op)
    shared = (ops for ops in groups.values() if len({id(op.enclosing_block) for op in ops}) > 1)
    for number, ops in enumerate(shared):
        for op in ops:
            op.weight_id = str(number)


def save_functions(functions: dict[str, SkeletonFunction], default: str, path: Path) -> None:
    """Save compressed functions as one multifunction package, each weight the functions share stored once.

    This is `ct.utils.save_multifunction` without its round trip through per-function packages (a reload
    unpacks each int4 weight into bit arrays) and with `share_weights` for its deduplication."""
    from coremltools.converters.mil.converter import mil_convert
    from coremltools.converters.mil.mil import Program
    from coremltools.proto import Model_pb2

    program, described = Program(), []
    for name, function in functions.items():
        program.add_function(name, function.program.functions["main"])
        d = function.description
        described.append(Model_pb2.FunctionDescription(name=name, input=d.input, output=d.output, state=d.state))
    share_weights(program)
    program.default_function_name = default
    program.skip_all_passes = True  # each function's passes ran in compress_function
    program.export_as_multifunction = True
    version = max(max(f.spec_version for f in functions.values()), 9)  # 9: iOS 18, the first with multifunction
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlmodel = mil_convert(program, convert_from="milinternal", convert_to="mlprogram",
                              compute_units=functions[default].compute_unit,
                              model_description=Model_pb2.ModelDescription(functions=described, defaultFunctionName=default),
                              specification_version=version, skip_model_load=True)
    mlmodel.save(str(path))
    # coremltools adds an ExecuTorch debugging map (op -> torch.export handle) when the program still
    # carries those scopes, as it does here: not part of the model, and not written by a reloaded program
    (path / "executorch_debug_handle_mapping.json").unlink(missing_ok=True)


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


def convert_function(step: CoreMLStep, tokens: int, compute: str, deduplicate: bool = True):  # noqa: ANN201
    """One function (T = tokens) as a Core ML mlprogram (not loaded: this may be Linux); with `deduplicate`
    False, equal constants are not merged (a skeleton's placeholders are all equal: exporter/coreml/skeleton.py)."""
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
    passes = ct.PassPipeline.DEFAULT
    if not deduplicate:
        passes.remove_passes(["common::const_deduplication"])
    return ct.convert(program, outputs=outputs, minimum_deployment_target=ct.target.iOS18,
                      compute_precision=precision, convert_to="mlprogram", skip_model_load=True, pass_pipeline=passes)


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
