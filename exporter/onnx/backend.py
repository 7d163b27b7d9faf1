"""The ONNX side of `qwen-edge export` (exporter/pipeline.py): onnx-community Qwen3.5 files.

    OUT/onnx/embed_tokens{suffix}.onnx (+ .onnx_data)
    OUT/onnx/decoder_model_merged{suffix}.onnx (+ .onnx_data)

Each activation dtype is traced once, from a skeleton of the decoder whose large matrices take no
memory (exporter/onnx/streamed.py); a float variant is that graph saved under its published name, a
quantized variant a transform of it (quant/onnx_weights.py). Saving lays out each data file and
leaves the streamed weights as holes; `finish` then reads every checkpoint tensor once, in blocks of
rows, and writes it into every variant. With `stream_weights=False` the decoder is built with its
weights in memory and the same steps write them directly: the reference the streamed export is
tested against (tests/test_streamed_export.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx_ir as ir
import onnxruntime
import torch

from exporter.onnx.external_data import external_info, set_external
from exporter.onnx.streamed import Sink, save_graph, save_proto, stream_weights
from exporter.onnx.trace import StreamedWeights, name_nodes_and_strip_trace_metadata, trace_decoder, trace_embed
from exporter.pipeline import files_bytes
from exporter.progress import Stages
from graphs.checkpoint import Checkpoint, expected_shapes, is_placeholder
from graphs.config import TextConfig
from graphs.errors import QwenEdgeError
from quant.onnx_weights import (EMBED_NAMES, QuantizedHead, packed_tensors, quantize_projections,
                                quantized_embed_graph)
from quant.schemes import QuantOptions, Scheme
from runtime_py.export_format import RECURRENT_FORMS, opset_imports

DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class OnnxOptions:
    """ONNX-only export options."""

    recurrent_ops: str = "contrib"  # exporter/onnx/forms.py; README says why contrib is the default
    quant: QuantOptions = field(default_factory=QuantOptions)
    all_logits: bool = False  # logits of every position (default: the last one)
    stream_weights: bool = True  # False: trace and write with the weights in memory (the test reference)

    def __post_init__(self) -> None:
        if self.recurrent_ops not in RECURRENT_FORMS:
            raise QwenEdgeError(f"--recurrent-ops {self.recurrent_ops!r}: use one of {', '.join(RECURRENT_FORMS)}")


@dataclass
class Traced:
    """One activation dtype's graphs, shared by the variants of that dtype."""

    embed: ir.Model
    decoder: ir.Model


class OnnxBackend:
    format = "onnx"

    def __init__(self, options: OnnxOptions = OnnxOptions()) -> None:
        self.options = options
        self.checkpoint: Checkpoint | None = None
        self.sinks: list[Sink] = []

    @property
    def cfg(self) -> TextConfig:
        return self.checkpoint.config

    def check(self, schemes: tuple[Scheme, ...]) -> None:
        for scheme in schemes:
            if not scheme.onnx:
                raise QwenEdgeError(f"--quant {scheme.name!r} is a Core ML weight option; export it with --format coreml")

    def check_config(self, cfg: TextConfig) -> None:
        """Every config that passed graphs/config.py exports to ONNX."""

    def prepare_stages(self, activations: str) -> list[str]:
        return [f"trace {activations} graphs"]

    def finish_stages(self) -> list[str]:
        return ["write weights"] if self.options.stream_weights else []

    def load(self, checkpoint: Checkpoint) -> Checkpoint:
        self.checkpoint, self.sinks = checkpoint, []
        return checkpoint

    def prepare(self, checkpoint: Checkpoint, activations: str, folder: Path, stages: Stages) -> Traced:
        logits = "all" if self.options.all_logits else "last"
        dtype = DTYPES[activations]
        weights = None
        if self.options.stream_weights:
            model = checkpoint.build_skeleton(dtype, logits=logits)
            weights = StreamedWeights(checkpoint, {
                name: (checkpoint.source_name(name), tuple(p.shape))
                for name, p in model.named_parameters(remove_duplicate=False) if is_placeholder(name, tuple(p.shape))})
        else:
            model = checkpoint.build_decoder(dtype, logits=logits)
        form = self.options.recurrent_ops
        return stages.run(lambda: Traced(trace_embed(model, weights), trace_decoder(model, form, weights)))

    def write_variant(self, traced: Traced, scheme: Scheme, folder: Path) -> dict:
        (folder / "onnx").mkdir(exist_ok=True)
        embed_name, decoder_name = scheme.files
        decoder = traced.decoder.clone()
        head = quantize_projections(decoder, scheme, self.options.quant) if scheme.weight_bits else None
        name_nodes_and_strip_trace_metadata(decoder)
        decoder_path = save_graph(decoder, folder / decoder_name, self.sinks)
        if scheme.weight_format("embed_tokens.weight", self.options.quant) is None:  # float, or a float table
            embed = traced.embed.clone()
            name_nodes_and_strip_trace_metadata(embed)
            save_graph(embed, folder / embed_name, self.sinks)
        else:
            self._write_quantized_embed(traced, scheme, head, decoder_path, folder / embed_name)
        return _variant_record(scheme, self.options.quant, folder, self.cfg)

    def _write_quantized_embed(self, traced: Traced, scheme: Scheme, head: QuantizedHead | None,
                               decoder_path: Path, path: Path) -> None:
        doc = f"Qwen3.5 token embedding, {scheme.name} (qwen-edge)"
        if self.cfg.tie_word_embeddings:  # the gather reads the LM head's quantized bytes from the decoder's data file
            parts = {part: value.const_value for part, value in head.parts.items()}
            embed = quantized_embed_graph(parts, head.fmt, head.vocab, head.hidden, doc)
            _share_lm_head_bytes(embed, decoder_path, head)
            onnx.save(embed, str(path))
            return
        table = next(iter(traced.embed.graph.initializers.values())).const_value  # [vocab, hidden]
        fmt = scheme.weight_format("embed_tokens.weight", self.options.quant)
        parts = packed_tensors(table, fmt, channels_first=True)
        embed = quantized_embed_graph(parts, fmt, table.shape[0], table.shape[1], doc)
        save_proto(embed, path, {EMBED_NAMES[part]: tensor for part, tensor in parts.items()}, self.sinks)

    def finish(self, folder: Path, stages: Stages) -> None:
        """The one pass over the checkpoint that fills every variant's streamed weights."""
        if not self.options.stream_weights:
            return
        total = sum(s.tensor.nbytes for s in self.sinks)
        stages.run_with_progress(lambda report: stream_weights(self.checkpoint, self.sinks, report),
                                 total, len(self.sinks))
        self.sinks = []

    def release(self, traced: Traced) -> None:
        traced.embed = traced.decoder = None

    def manifest_fields(self, cfg: TextConfig) -> dict:
        form = RECURRENT_FORMS[self.options.recurrent_ops]
        return {
            "recurrent_ops": form.name,
            "recurrent_ops_domain": form.domain or "ai.onnx",
            "min_onnxruntime": form.min_onnxruntime,
            "logits": "all positions" if self.options.all_logits else "last position",
            "exported_with_onnxruntime": onnxruntime.__version__,
        }


def _share_lm_head_bytes(embed: onnx.ModelProto, decoder_path: Path, head: QuantizedHead) -> None:
    """Point the embedding's initializers at the LM head's bytes in the saved decoder's data file."""
    decoder = onnx.load(str(decoder_path), load_external_data=False)
    by_name = {t.name: t for t in decoder.graph.initializer}
    names = {EMBED_NAMES[part]: value.name for part, value in head.parts.items()}
    for tensor in embed.graph.initializer:
        info = external_info(by_name[names[tensor.name]])
        set_external(tensor, info["location"], int(info.get("offset", 0)), int(info["length"]))


def _variant_record(scheme: Scheme, quant: QuantOptions, root: Path, cfg: TextConfig) -> dict:
    embed, decoder = scheme.files
    record = {"embed_tokens": embed, "decoder": decoder, "activations": scheme.activations,
              "opset_imports": opset_imports(onnx.load(str(root / decoder), load_external_data=False))}
    if scheme.weight_bits:
        record.update(weight_bits=scheme.weight_bits, block_size=quant.block_size, symmetric=quant.symmetric,
                      accuracy_level=quant.accuracy_level,
                      weight_formats=scheme.family_formats(expected_shapes(cfg), quant))
    record["bytes_on_disk"] = files_bytes(root, [f for name in (embed, decoder) for f in (name, name + "_data")])
    return record


def export_onnx(checkpoint: str | Path, out: Path, schemes: str = "fp32", options: OnnxOptions = OnnxOptions(), *,
                force: bool = False, progress: bool = True) -> Path:
    """`qwen-edge export CHECKPOINT OUT --quant SCHEMES` from Python."""
    from exporter.pipeline import ExportRequest, run_export
    from quant.schemes import parse_schemes

    return run_export(ExportRequest(checkpoint, out, tuple(parse_schemes(schemes)), force, progress), OnnxBackend(options))
