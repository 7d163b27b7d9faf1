"""A draft head that scores only the first N tokens of the vocabulary: cheaper drafts, same output.

Most of an MTP draft call is its LM head over the full vocabulary (on the 0.8B shape, q4, 2 threads,
about 85 % of the call; BENCHMARKS.md). Speculative decoding stays lossless whatever the draft
proposes (the decoder verifies every draft), so the head may rank a subset of tokens: a draft
outside it is simply never proposed. Byte-level BPE vocabularies (Qwen's included) number their
tokens in merge order, so the first ids are the bytes and the most frequent merges.

The subset costs no bytes: an int4/int8 LM head is stored row-major by output token (MatMulNBits
data [V, blocks, bytes], scales [V, blocks], zero points [V, ...]), so the first N rows are a prefix
of each tensor, which the MTP graph reads from the decoder's data file at the same offset with a
shorter length. A float LM head is stored transposed ([hidden, V]), where the subset is not a
prefix; float variants keep the full vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from exporter.onnx.external_data import external_info, set_external

LM_HEAD_NODE = "/lm_head/MatMulNBits"
LOGITS = "logits"


def limit_draft_vocab(mtp_path: Path, tokens: int) -> int | None:
    """Make the MTP graph at `mtp_path` score only tokens [0, tokens), in place. Returns the draft
    vocabulary it now has, or None when its LM head is not a quantized one (float variants) or
    already has no more than `tokens` rows."""
    model = onnx.load(str(mtp_path), load_external_data=False)
    graph = model.graph
    node = next((n for n in graph.node if n.name == LM_HEAD_NODE and n.op_type == "MatMulNBits"), None)
    if node is None:
        return None
    attrs = {a.name: a for a in node.attribute}
    vocab = attrs["N"].i
    if tokens >= vocab:
        return None
    by_name = {t.name: t for t in graph.initializer}
    for name in node.input[1:]:
        if not name:
            continue
        tensor = by_name[name]
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = external_info(tensor)
            keep = int(info["length"]) // tensor.dims[0] * tokens
            set_external(tensor, info["location"], int(info.get("offset", 0)), keep)
        else:  # a small graph's weights may be stored inline
            tensor.raw_data = tensor.raw_data[: len(tensor.raw_data) // tensor.dims[0] * tokens]
        tensor.dims[0] = tokens
    attrs["N"].i = tokens
    limited = set(node.input[1:]) | set(node.output)
    kept = [v for v in graph.value_info if v.name not in limited]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    for output in graph.output:
        if output.name == LOGITS:  # the head's output, or its cast to float32 (fp16 variants)
            output.type.tensor_type.shape.dim[-1].dim_value = tokens
    onnx.save(model, str(mtp_path))
    return tokens
