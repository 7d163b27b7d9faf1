"""A small NumPy interpreter of the MIL ops our Core ML exports contain, so packages run on Linux.

The program comes from the saved package through coremltools' MIL-proto loader (const values read
from the weight blob). Every op's result is cast to the dtype the program declares for it, so an
fp16 program computes in fp16 at op boundaries; inside an op, sums (matmul, linear, conv,
reductions, softmax) accumulate in fp32, as Core ML's fp16 kernels do. Compressed weights
(constexpr ops) are decoded exactly as Core ML defines them. An op not listed here is a
QwenEdgeError naming it, never skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from graphs.errors import QwenEdgeError

Op = object  # a coremltools pymil Operation
Handler = Callable[[dict], object]


# fp32 copies of the program's fp16 constants (weights, decoded weights), made once: {id: (array, copy)}
_CONSTANT_F32: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _f32(x: np.ndarray) -> np.ndarray:
    if id(x) in _CONSTANT_F32:
        return _CONSTANT_F32[id(x)][1]
    return np.asarray(x, dtype=np.float32) if np.asarray(x).dtype == np.float16 else np.asarray(x)


def _register_constant(x: object) -> None:
    """Widen an fp16 constant once (op results are cast to their declared dtype, so it computes the same)."""
    if isinstance(x, np.ndarray) and x.dtype == np.float16 and x.size >= 1024:
        _CONSTANT_F32[id(x)] = (x, x.astype(np.float32))


def _axes(axes: object, rank: int) -> tuple[int, ...] | None:
    return None if axes is None else tuple(int(a) % rank for a in np.atleast_1d(axes))


def _index(x: np.ndarray, a: dict) -> tuple:
    """The slice of slice_by_index / slice_update: begin, end, stride with their masks."""
    rank = x.ndim
    begin, end = np.atleast_1d(a["begin"]), np.atleast_1d(a["end"])
    stride = np.atleast_1d(a.get("stride") if a.get("stride") is not None else np.ones(rank, int))
    begin_mask = a.get("begin_mask") if a.get("begin_mask") is not None else [False] * rank
    end_mask = a.get("end_mask") if a.get("end_mask") is not None else [False] * rank
    squeeze = a.get("squeeze_mask") if a.get("squeeze_mask") is not None else [False] * rank
    index = []
    for i in range(rank):
        if squeeze[i]:
            index.append(int(begin[i]))
            continue
        b = None if begin_mask[i] else int(begin[i])
        e = None if end_mask[i] else int(end[i])
        index.append(slice(b, e, int(stride[i])))
    return tuple(index)


def _reduce(fn: Callable) -> Handler:
    def run(a: dict) -> np.ndarray:
        x = _f32(a["x"])
        axes = _axes(a.get("axes"), x.ndim)
        return fn(x, axis=axes, keepdims=bool(a.get("keep_dims", False)))
    return run


def _conv(a: dict) -> np.ndarray:
    x, w = _f32(a["x"]), _f32(a["weight"])
    if x.ndim != 3:
        raise QwenEdgeError(f"MIL interpreter: conv is implemented for 1-D inputs only, got rank {x.ndim}")
    groups = int(a.get("groups", 1))
    stride = int(np.atleast_1d(a.get("strides", [1]))[0])
    dilation = int(np.atleast_1d(a.get("dilations", [1]))[0])
    pad_type = a.get("pad_type", "valid")
    if pad_type == "custom":
        pad = np.atleast_1d(a.get("pad", [0, 0]))
        x = np.pad(x, ((0, 0), (0, 0), (int(pad[0]), int(pad[1]))))
    elif pad_type != "valid":
        raise QwenEdgeError(f"MIL interpreter: conv pad_type {pad_type!r} is not implemented")
    n, cin, _ = x.shape
    cout, cin_g, k = w.shape
    span = dilation * (k - 1) + 1
    windows = np.lib.stride_tricks.sliding_window_view(x, span, axis=2)[:, :, ::stride, ::dilation]  # N,C,L,K
    windows = windows.reshape(n, groups, cin // groups, -1, k)
    weight = w.reshape(groups, cout // groups, cin_g, k)
    out = np.einsum("ngclk,gock->ngol", windows, weight).reshape(n, cout, -1)
    if a.get("bias") is not None:
        out = out + _f32(a["bias"])[None, :, None]
    return out


def _pad(a: dict) -> np.ndarray:
    """Constant padding; `pad` holds (before, after) pairs for the last len(pad)/2 axes."""
    x, pairs = a["x"], np.atleast_1d(a["pad"]).reshape(-1, 2)
    if a.get("mode", "constant") != "constant":
        raise QwenEdgeError(f"MIL interpreter: pad mode {a.get('mode')!r} is not implemented")
    widths = [(0, 0)] * (x.ndim - len(pairs)) + [(int(b), int(e)) for b, e in pairs]
    return np.pad(x, widths, constant_values=a.get("constant_val", 0.0))


def _split(a: dict) -> list[np.ndarray]:
    x, axis = a["x"], int(a["axis"])
    if a.get("split_sizes") is not None:
        points = np.cumsum(np.atleast_1d(a["split_sizes"]))[:-1]
        return np.split(x, points, axis=axis)
    return np.split(x, int(a["num_splits"]), axis=axis)


def _expand_dims(a: dict) -> np.ndarray:
    x = a["x"]
    rank = x.ndim + len(np.atleast_1d(a["axes"]))
    for axis in sorted(int(v) % rank for v in np.atleast_1d(a["axes"])):
        x = np.expand_dims(x, axis)
    return x


def _squeeze(a: dict) -> np.ndarray:
    axes = a.get("axes")
    return np.squeeze(a["x"]) if axes is None else np.squeeze(a["x"], axis=_axes(axes, a["x"].ndim))


def _softmax(a: dict) -> np.ndarray:
    x = _f32(a["x"])
    e = np.exp(x - x.max(axis=int(a["axis"]), keepdims=True))
    return e / e.sum(axis=int(a["axis"]), keepdims=True)


def _matmul(a: dict) -> np.ndarray:
    x, y = _f32(a["x"]), _f32(a["y"])
    if a.get("transpose_x"):
        x = np.swapaxes(x, -1, -2)
    if a.get("transpose_y"):
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


def _linear(a: dict) -> np.ndarray:
    x, w = _f32(a["x"]), _f32(a["weight"])
    out = (x.reshape(-1, x.shape[-1]) @ w.T).reshape(*x.shape[:-1], w.shape[0])  # 2-D: NumPy's BLAS path
    return out + _f32(a["bias"]) if a.get("bias") is not None else out


def _layer_norm(a: dict) -> np.ndarray:
    """MIL layer_norm over `axes`, with optional gamma / beta."""
    x = _f32(a["x"])
    axes = tuple(int(v) for v in np.atleast_1d(a["axes"]))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    out = (x - mean) / np.sqrt(var + float(a.get("epsilon", 1e-5)))
    if a.get("gamma") is not None:
        out = out * _f32(a["gamma"])
    if a.get("beta") is not None:
        out = out + _f32(a["beta"])
    return out


def _gelu(a: dict) -> np.ndarray:
    """MIL gelu: EXACT (erf), TANH_APPROXIMATION or SIGMOID_APPROXIMATION."""
    from math import erf, pi, sqrt

    x = _f32(a["x"])
    mode = str(a.get("mode", "EXACT"))
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1 + np.tanh(sqrt(2 / pi) * (x + 0.044715 * x ** 3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1 + np.exp(-1.702 * x))
    return 0.5 * x * (1 + np.vectorize(erf, otypes=[np.float64])(x / sqrt(2))).astype(np.float32)


def _band_part(a: dict) -> np.ndarray:
    x = a["x"]
    rows, cols = np.arange(x.shape[-2])[:, None], np.arange(x.shape[-1])[None, :]
    lower, upper = int(a.get("lower", -1)), int(a.get("upper", -1))
    keep = np.ones((x.shape[-2], x.shape[-1]), bool)
    if lower >= 0:
        keep &= rows - cols <= lower
    if upper >= 0:
        keep &= cols - rows <= upper
    return np.where(keep, x, np.zeros((), x.dtype))


def _cumsum(a: dict) -> np.ndarray:
    x, axis = _f32(a["x"]), int(a.get("axis", 0))
    if a.get("reverse"):
        x = np.flip(x, axis)
    out = np.cumsum(x, axis=axis)
    if a.get("exclusive"):
        out = out - x
    return np.flip(out, axis) if a.get("reverse") else out


def _slice_update(a: dict) -> np.ndarray:
    x = np.array(a["x"], copy=True)
    index = _index(x, a)
    x[index] = np.asarray(a["update"]).reshape(x[index].shape)
    return x


def _block_scale(values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Repeat a per-block tensor (scale, offset, LUT group) up to `shape`: block size = shape / its shape."""
    for axis, (full, part) in enumerate(zip(shape, values.shape)):
        if full != part:
            values = np.repeat(values, full // part, axis=axis)
    return values


def _blockwise_shift_scale(a: dict) -> np.ndarray:
    data = a["data"].astype(np.float32)
    if a.get("offset") is not None:
        data = data - _block_scale(a["offset"].astype(np.float32), data.shape)
    return data * _block_scale(a["scale"].astype(np.float32), data.shape)


def _lut_to_dense(a: dict) -> np.ndarray:
    """iOS18 LUT: lut [g_0 … g_{r-1}, 2^n, vector]; each block of indices reads its own group's table."""
    indices, lut = a["indices"].astype(np.int64), a["lut"]
    if a.get("vector_axis") is not None or lut.shape[-1] != 1:
        raise QwenEdgeError("MIL interpreter: vector palettization (vector_axis) is not implemented")
    rank = indices.ndim
    groups = lut.reshape(*lut.shape[:rank], lut.shape[rank])  # [g_0 … g_{r-1}, 2^n]
    group_index = np.ix_(*[np.arange(n) // (n // g) for n, g in zip(indices.shape, groups.shape[:rank])])
    return groups[(*group_index, indices)]


def _affine_dequantize(a: dict) -> np.ndarray:
    q = a["quantized_data"].astype(np.float32)
    axis, shape = int(a["axis"]), [1] * q.ndim
    shape[axis] = -1
    zero, scale = np.asarray(a["zero_point"], np.float32), np.asarray(a["scale"], np.float32)
    zero = zero.reshape(shape) if zero.ndim else zero
    scale = scale.reshape(shape) if scale.ndim else scale
    return (q - zero) * scale


ELEMENTWISE: dict[str, Handler] = {
    "add": lambda a: a["x"] + a["y"],
    "sub": lambda a: a["x"] - a["y"],
    "mul": lambda a: a["x"] * a["y"],
    "real_div": lambda a: a["x"] / a["y"],
    "pow": lambda a: np.power(a["x"], a["y"]),
    "maximum": lambda a: np.maximum(a["x"], a["y"]),
    "minimum": lambda a: np.minimum(a["x"], a["y"]),
    "equal": lambda a: a["x"] == a["y"],
    "not_equal": lambda a: a["x"] != a["y"],
    "greater": lambda a: a["x"] > a["y"],
    "greater_equal": lambda a: a["x"] >= a["y"],
    "less": lambda a: a["x"] < a["y"],
    "less_equal": lambda a: a["x"] <= a["y"],
    "logical_and": lambda a: np.logical_and(a["x"], a["y"]),
    "logical_or": lambda a: np.logical_or(a["x"], a["y"]),
    "logical_not": lambda a: np.logical_not(a["x"]),
    "exp": lambda a: np.exp(_f32(a["x"])),
    "tanh": lambda a: np.tanh(_f32(a["x"])),
    "sqrt": lambda a: np.sqrt(_f32(a["x"])),
    "rsqrt": lambda a: 1.0 / np.sqrt(_f32(a["x"]) + float(a.get("epsilon", 1e-12))),
    "cos": lambda a: np.cos(_f32(a["x"])),
    "sin": lambda a: np.sin(_f32(a["x"])),
    "sigmoid": lambda a: 1.0 / (1.0 + np.exp(-_f32(a["x"]))),
    "silu": lambda a: _f32(a["x"]) / (1.0 + np.exp(-_f32(a["x"]))),
    "softplus": lambda a: np.logaddexp(0.0, _f32(a["x"])),
    "clip": lambda a: np.clip(a["x"], a["alpha"], a["beta"]),
    "select": lambda a: np.where(a["cond"], a["a"], a["b"]),
    "cast": lambda a: a["x"],  # the declared output dtype does the cast
    "identity": lambda a: a["x"],
}

HANDLERS: dict[str, Handler] = {
    **ELEMENTWISE,
    "linear": _linear,
    "matmul": _matmul,
    "conv": _conv,
    "reduce_sum": _reduce(np.sum),
    "reduce_mean": _reduce(np.mean),
    "reduce_max": _reduce(np.max),
    "softmax": _softmax,
    "layer_norm": _layer_norm,
    "gelu": _gelu,
    "cumsum": _cumsum,
    "band_part": _band_part,
    "reshape": lambda a: a["x"],  # reshaped to the declared (static) output shape
    "transpose": lambda a: np.transpose(a["x"], [int(p) for p in a["perm"]]),
    "expand_dims": _expand_dims,
    "squeeze": _squeeze,
    "concat": lambda a: np.concatenate([np.atleast_1d(v) for v in a["values"]], axis=int(a["axis"])),
    "tile": lambda a: np.tile(a["x"], [int(r) for r in a["reps"]]),
    "split": _split,
    "pad": _pad,
    "slice_by_index": lambda a: a["x"][_index(a["x"], a)],
    "slice_update": _slice_update,
    "gather": lambda a: np.take(a["x"], np.asarray(a["indices"]).astype(np.int64), axis=int(a.get("axis", 0))),
    "shape": lambda a: np.array(a["x"].shape, np.int32),
    "fill": lambda a: np.full([int(s) for s in a["shape"]], a.get("value", 0.0)),
    "range_1d": lambda a: np.arange(a["start"], a["end"], a["step"]),
    "constexpr_blockwise_shift_scale": _blockwise_shift_scale,
    "constexpr_lut_to_dense": _lut_to_dense,
    "constexpr_affine_dequantize": _affine_dequantize,
}
STATE_OPS = ("read_state", "coreml_update_state")
SUPPORTED_OPS = frozenset((*HANDLERS, *STATE_OPS, "const"))


def builtin_np_dtype(builtin: object) -> np.dtype:
    """NumPy dtype holding a MIL element type (sub-byte ints in a byte)."""
    from coremltools.converters.mil.mil import types

    if types.is_int(builtin) and builtin.get_bitwidth() < 8:
        return np.dtype(np.int8 if not builtin.is_unsigned() else np.uint8)
    return np.dtype(types.nptype_from_builtin(builtin))


def np_dtype(var: object) -> np.dtype:
    return builtin_np_dtype(var.dtype)


@dataclass(frozen=True)
class _Step:
    """One op of a function, its inputs and outputs resolved once (pymil attribute access is slow)."""

    kind: str
    name: str
    handler: Handler | None
    inputs: dict[str, object]  # input name -> _Ref, or a list of them
    outputs: tuple[tuple[str, tuple[int | None, ...], np.dtype], ...]  # (name, declared shape, dtype)
    cache_key: int  # id of the op: constexpr results are cached under it


@dataclass(frozen=True)
class _Ref:
    name: str
    computed: bool  # a function input or an op's output (else a constant: `value`)
    value: object = None


def _compile(function: object) -> tuple[list[_Step], dict[str, np.dtype], list[tuple[str, object]]]:
    """(steps, input dtypes, outputs as (name, constant value)) of a MIL function."""
    computed = set(function.inputs)
    steps = []

    def ref(var: object) -> object:
        if isinstance(var, (list, tuple)):
            return [ref(v) for v in var]
        if var.name in computed:
            return _Ref(var.name, True)
        _register_constant(var.val)
        return _Ref(var.name, False, var.val)

    for op in function.operations:
        if op.op_type == "const":
            continue
        inputs = {k: ref(v) for k, v in op.inputs.items()}
        outputs = tuple((var.name, tuple(d if isinstance(d, (int, np.integer)) else None for d in var.shape),
                         np_dtype(var)) for var in op.outputs)
        steps.append(_Step(op.op_type, op.name, HANDLERS.get(op.op_type), inputs, outputs, id(op)))
        computed.update(var.name for var in op.outputs)
    input_dtypes = {name: np_dtype(var) for name, var in function.inputs.items()}
    return steps, input_dtypes, [(var.name, var.val) for var in function.outputs]


_PLANS: dict[int, tuple[object, tuple]] = {}  # id(function) -> (function, its compiled form)


def run_function(function: object, feeds: dict[str, np.ndarray], states: dict[str, np.ndarray],
                 constants: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    """Execute one MIL function. `states` is read and updated in place; `constants` caches decoded
    weights across calls (keyed by op identity)."""
    if id(function) not in _PLANS or _PLANS[id(function)][0] is not function:
        _PLANS[id(function)] = (function, _compile(function))
    steps, input_dtypes, outputs = _PLANS[id(function)][1]
    env: dict[str, object] = {}
    for name, dtype in input_dtypes.items():
        if name in states:
            continue
        if name not in feeds:
            raise QwenEdgeError(f"MIL interpreter: input {name!r} was not given")
        env[name] = np.asarray(feeds[name]).astype(dtype, copy=False)

    def value(r: object) -> object:
        if isinstance(r, list):
            return [value(v) for v in r]
        if not r.computed:
            if r.value is None:
                raise QwenEdgeError(f"MIL interpreter: value {r.name!r} has no value")
            return r.value
        if r.name not in env:
            raise QwenEdgeError(f"MIL interpreter: value {r.name!r} used before it was computed")
        return env[r.name]

    for step in steps:
        kind = step.kind
        if kind == "read_state":
            env[step.outputs[0][0]] = states[step.inputs["input"].name]
            continue
        if kind == "coreml_update_state":
            state = step.inputs["state"].name
            new = np.asarray(value(step.inputs["value"])).astype(states[state].dtype)
            states[state] = new
            env[step.outputs[0][0]] = new
            continue
        if step.handler is None:
            raise QwenEdgeError(f"MIL interpreter: op type {kind!r} (op {step.name!r}) is not implemented; "
                                "add it to exporter/coreml/mil_interpreter.py")
        if kind.startswith("constexpr_") and step.cache_key in constants:
            results = [constants[step.cache_key]]
        else:
            args = {k: value(v) for k, v in step.inputs.items()}
            out = step.handler(args)
            results = out if isinstance(out, list) else [out]
            if kind.startswith("constexpr_"):
                constants[step.cache_key] = results[0] = np.asarray(results[0]).astype(step.outputs[0][2])
                _register_constant(results[0])
        for (name, declared, dtype), result in zip(step.outputs, results):
            result = np.asarray(result)
            if kind == "reshape":
                result = result.reshape([-1 if d is None else d for d in declared] if declared.count(None) <= 1
                                        else [int(d) for d in args["shape"]])
            elif len(result.shape) != len(declared) or any(d is not None and d != r for d, r in zip(declared, result.shape)):
                raise QwenEdgeError(f"MIL interpreter: {kind} {step.name!r} gave shape {result.shape}, "
                                    f"the program declares {declared}")
            env[name] = result.astype(dtype, copy=False)
    return {name: env[name] if name in env else val for name, val in outputs}
