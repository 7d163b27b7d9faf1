"""The Core ML skeleton conversion (exporter/coreml/skeleton.py) writes what a full-weight conversion writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("coremltools")

from exporter.coreml.skeleton import compress_function, convert_function, convert_skeleton, is_coreml_placeholder
from graphs.checkpoint import open_checkpoint
from graphs.coreml_step import CoreMLStep
from graphs.recurrent_ops import MATMUL_ONLY
from quant.coreml_weights import _compress, chosen_formats, weight_constants
from quant.schemes import SCHEMES


def _weights(program) -> dict[str, np.ndarray]:  # noqa: ANN001
    """{const op name: value} of every constant larger than a handful of values (weights, scales, tables)."""
    return {op.name: op.outputs[0].val for function in program.functions.values() for op in function.operations
            if op.op_type == "const" and isinstance(op.outputs[0].val, np.ndarray) and op.outputs[0].val.size > 16}


@pytest.mark.parametrize("model, scheme", [("default", "q4"), ("default", "fp16"), ("kv_double_untied", "q4")])
def test_skeleton_conversion_stores_the_full_conversions_weights(default_checkpoint: Path,
                                                                 tiny_checkpoints: dict[str, Path], model: str,
                                                                 scheme: str):
    """Tied (the default model) and untied (a separate embedding table, as the 9B has) layouts."""
    folder = default_checkpoint if model == "default" else tiny_checkpoints[model]
    checkpoint = open_checkpoint(folder, mtp=False)
    cfg, chosen_scheme = checkpoint.config, SCHEMES[scheme]
    skeleton = checkpoint.build_skeleton(kernels=MATMUL_ONLY, logits="last", placeholder=is_coreml_placeholder)
    placeholders = [p for p in skeleton.parameters() if 0 in p.stride()]
    assert len(placeholders) > 10  # the large matrices hold no memory
    function = convert_skeleton(CoreMLStep(skeleton, 64).eval(), 1, chosen_scheme.activations, cfg)
    assert function.placeholders
    compress_function(function, chosen_scheme, checkpoint)

    full = convert_function(CoreMLStep(checkpoint.build_decoder(kernels=MATMUL_ONLY, logits="last"), 64).eval(), 1,
                            chosen_scheme.activations)
    reference = _compress(full, chosen_scheme, chosen_formats(chosen_scheme, weight_constants(full, cfg), cfg))

    ours, theirs = _weights(function.program), _weights(reference._mil_program)
    assert sorted(ours) == sorted(theirs)
    for name, value in theirs.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)
    filled = [name for name in ours if any(name.startswith(const) for const in function.placeholders)]
    assert len(filled) >= len(function.placeholders)  # each placeholder is among them, with its real values
    assert not any(0 in value.strides for value in ours.values())
