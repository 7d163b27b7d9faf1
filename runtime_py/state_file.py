"""A sequence's state in a file: restore a prompt prefix instead of prefilling it again.

One safetensors file per saved sequence (batch 1):

    state.<input name>     every decoder state tensor, under the name of the decoder input that takes it
    head.<input name>      the MTP head's cache, likewise, for exports with a head
    token_ids [L] int64    the tokens the state has consumed
    attention_mask [1, L], positions [1]   what the runtime carries beside the tensors
    last_logits [V] fp32   the decoder's logits after the last token (the next token's distribution)
    last_hidden [1, 1, H]  its hidden state there (the head's input for the next entry), with a head

Metadata names the format and version and the export it came from: the variant's fingerprint
(runtime_py/export_format.py: SHA-256 of its graphs and weights), so a state from another model,
another export or another variant is refused with the reason instead of silently continuing a
different computation. Shapes are checked against the graph's inputs too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from graphs.errors import QwenEdgeError
from graphs.state import is_state_input
from runtime_py.export_format import read_manifest, variant_fingerprint
from runtime_py.safetensors_numpy import SafetensorsError, read_safetensors, write_safetensors
from runtime_py.sequence import PrefixState
from runtime_py.session import OnnxModel, SequenceState

STATE_FORMAT = "qwen-edge-sequence-state"
STATE_VERSION = 1


def _identity(model: OnnxModel) -> dict[str, str]:
    manifest = read_manifest(model.export_dir)
    return {"format": STATE_FORMAT, "version": str(STATE_VERSION), "variant": model.variant,
            "fingerprint": variant_fingerprint(model.export_dir, model.variant),
            "source_checkpoint": str(manifest.get("source_checkpoint", "")),
            "qwen_edge_version": str(manifest.get("qwen_edge_version", ""))}


def save_sequence(path: Path | str, model: OnnxModel, saved: PrefixState) -> Path:
    """Write `saved` to `path` (a new file replaces the old one only once it is whole)."""
    if saved.state.attention_mask.shape[0] != 1:
        raise ValueError("only single-sequence states are saved")
    tensors = {"state." + name: value.numpy() for name, value in saved.state.values.items()}
    if saved.head_state is not None:
        tensors.update({"head." + name: value.numpy() for name, value in saved.head_state.values.items()})
        tensors["head.attention_mask"] = saved.head_state.attention_mask
        tensors["head.positions"] = saved.head_state.positions
    if saved.last_hidden is not None:
        tensors["last_hidden"] = saved.last_hidden
    tensors.update(token_ids=np.asarray(saved.token_ids, np.int64), attention_mask=saved.state.attention_mask,
                   positions=saved.state.positions, last_logits=np.asarray(saved.last_logits, np.float32))
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    write_safetensors(partial, tensors, _identity(model))
    partial.replace(path)
    return path


def load_sequence(path: Path | str, model: OnnxModel) -> PrefixState:
    """Read a state written by `save_sequence` for this export and variant; anything else is refused."""
    path = Path(path)
    if not path.is_file():
        raise QwenEdgeError(f"{path}: no such state file; write one with 'qwen-edge generate --save-state'")
    try:
        tensors, metadata = read_safetensors(path)
    except (SafetensorsError, OSError) as exc:
        raise QwenEdgeError(f"{path}: not a readable state file ({exc}); save the state again") from None
    _check_identity(path, metadata, _identity(model))
    _check_sequence(path, tensors)
    state = _restore(path, tensors, "state.", model.state_inputs, tensors["attention_mask"], tensors["positions"])
    head_state = None
    if any(k.startswith("head.") for k in tensors):
        if "head.attention_mask" not in tensors or "head.positions" not in tensors or "last_hidden" not in tensors:
            raise QwenEdgeError(f"{path}: the MTP head's cache is incomplete; the file is damaged, save the state again")
        head_inputs = [i for i in model.mtp.session.get_inputs() if is_state_input(i.name)]
        head_state = _restore(path, tensors, "head.", head_inputs, tensors["head.attention_mask"],
                              tensors["head.positions"])
    return PrefixState(state, tensors["token_ids"].tolist(), tensors["last_logits"], head_state,
                         tensors.get("last_hidden"))


def _check_identity(path: Path, got: dict, want: dict) -> None:
    if got.get("format") != STATE_FORMAT:
        raise QwenEdgeError(f"{path}: not a qwen-edge state file; write one with 'qwen-edge generate --save-state'")
    if got.get("version") != want["version"]:
        raise QwenEdgeError(f"{path}: state format version {got.get('version')} is not {want['version']}, which this "
                            "qwen-edge reads; save the state again")
    if got.get("fingerprint") != want["fingerprint"]:
        raise QwenEdgeError(
            f"{path}: the state was saved from another model or export (variant '{got.get('variant')}' of "
            f"'{got.get('source_checkpoint')}', fingerprint {str(got.get('fingerprint'))[:12]}), not this one "
            f"(variant '{want['variant']}' of '{want['source_checkpoint']}', fingerprint {want['fingerprint'][:12]}); "
            "save the state again with this export")


_SEQUENCE = ("token_ids", "attention_mask", "positions", "last_logits")


def _check_sequence(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """The sequence entries are there and agree with each other (the tokens are what the state consumed)."""
    missing = [name for name in _SEQUENCE if name not in tensors]
    if missing:
        raise QwenEdgeError(f"{path}: {', '.join(missing)} missing; the file is damaged, save the state again")
    count = tensors["token_ids"].shape[0]
    if (tensors["token_ids"].ndim != 1 or tensors["attention_mask"].shape != (1, count)
            or tensors["positions"].tolist() != [count]):
        raise QwenEdgeError(f"{path}: token_ids, attention_mask and positions disagree about the length; "
                            "the file is damaged, save the state again")


def _restore(path: Path, tensors: dict[str, np.ndarray], prefix: str, inputs: list, mask: np.ndarray,
             positions: np.ndarray) -> SequenceState:
    """The state tensors under `prefix`, checked against the graph inputs that take them."""
    values = {}
    length = mask.shape[1]
    for spec in inputs:
        array = tensors.get(prefix + spec.name)
        if array is None:
            raise QwenEdgeError(f"{path}: tensor '{prefix}{spec.name}' is missing; the file is damaged, save the state again")
        want = [1 if d == "batch_size" else (length if isinstance(d, str) else d) for d in spec.shape]
        if list(array.shape) != want:
            raise QwenEdgeError(f"{path}: '{prefix}{spec.name}' has shape {list(array.shape)}, the graph takes {want}; "
                                "the file is damaged, save the state again")
        values[spec.name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
    return SequenceState(values, mask.astype(np.int64), positions.astype(np.int64))
