"""The ONNX side of `qwen-edge export` (exporter/pipeline.py): onnx-community Qwen3.5 files.

    OUT/onnx/embed_tokens{suffix}.onnx (+ .onnx_data)
    OUT/onnx/decoder_model_merged{suffix}.onnx (+ .onnx_data)
    OUT/onnx/mtp{suffix}.onnx (+ .onnx_data)      when the checkpoint has an MTP head (graphs/mtp.py)
    OUT/onnx/vision_encoder{suffix}.onnx (+ .onnx_data)   when the checkpoint has a vision tower

Each activation dtype is traced once, from a skeleton of the decoder whose large matrices take no
memory (exporter/onnx/streamed.py); a float variant is that graph saved under its published name, a
quantized variant a transform of it (quant/onnx_weights.py). Saving lays out each data file and
leaves the streamed weights as holes; `finish` then reads every checkpoint tensor once, in blocks of
rows, and writes it into every variant. With `stream_weights=False` the decoder is built with its
weights in memory and the same steps write them directly: the reference the streamed export is
tested against (tests/test_streamed_export.py).

The MTP graph is traced from a skeleton of the head the same way, quantized by the same scheme, and
streamed in the same pass; once its bytes are written it reads the LM head's bytes from the decoder's
data file (`share_identical_weights`). A variant's size and fingerprint are recorded after that.
The vision tower (exporter/onnx/vision.py) is small beside the decoder and is traced with its
weights in memory, into a scratch folder per dtype, by a helper process while this one traces the
decoder (`VisionTrace`).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx_ir as ir
import onnxruntime
import torch

from exporter.onnx.draft_vocab import limit_draft_vocab
from exporter.onnx.external_data import external_info, set_external, share_identical_weights
from exporter.onnx.streamed import Sink, save_graph, save_proto, stream_weights
from exporter.onnx.trace import (StreamedWeights, name_nodes_and_strip_trace_metadata, trace_decoder, trace_embed,
                                 trace_mtp)
from exporter.onnx.vision import VisionTrace, write_vision_variant
from exporter.pipeline import files_bytes
from exporter.progress import Stages
from graphs.checkpoint import Checkpoint, expected_shapes, is_placeholder
from graphs.config import TextConfig
from graphs.errors import QwenEdgeError
from graphs.mtp import MTPDraftStep
from quant.onnx_weights import (EMBED_NAMES, QuantizedHead, packed_tensors, quantize_projections,
                                quantized_embed_graph)
from quant.schemes import QuantOptions, Scheme
from runtime_py.export_format import RECURRENT_FORMS, fingerprint_files, opset_imports, variant_files

DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class OnnxOptions:
    """ONNX-only export options."""

    recurrent_ops: str = "contrib"  # exporter/onnx/forms.py; README says why contrib is the default
    quant: QuantOptions = field(default_factory=QuantOptions)
    all_logits: bool = False  # logits of every position (default: the last one)
    mtp: bool = True  # export the checkpoint's MTP head when it has one (--no-mtp: leave it out)
    stream_weights: bool = True  # False: trace and write with the weights in memory (the test reference)
    draft_vocab: int | None = None  # the MTP head drafts among the first N tokens only (exporter/onnx/draft_vocab.py)

    def __post_init__(self) -> None:
        if self.draft_vocab is not None and self.draft_vocab < 1:
            raise QwenEdgeError(f"--draft-vocab {self.draft_vocab}: give a number of tokens, at least 1")
        if self.recurrent_ops not in RECURRENT_FORMS:
            raise QwenEdgeError(f"--recurrent-ops {self.recurrent_ops!r}: use one of {', '.join(RECURRENT_FORMS)}")


@dataclass
class Traced:
    """One activation dtype's graphs, shared by the variants of that dtype."""

    embed: ir.Model
    decoder: ir.Model
    mtp: ir.Model | None = None  # the MTP head's graph, when the export has one
    vision_dir: Path | None = None  # scratch folder of the traced float vision tower, when there is one


class OnnxBackend:
    format = "onnx"

    def __init__(self, options: OnnxOptions = OnnxOptions()) -> None:
        self.options = options
        self.wants_mtp = options.mtp
        self.checkpoint: Checkpoint | None = None
        self.sinks: list[Sink] = []
        self.written: list[tuple[str, dict]] = []  # (scheme name, variant record) that `finish` completes
        self.mtp_note: str | None = None

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
        self.checkpoint, self.sinks, self.written = checkpoint, [], []
        self.mtp_note = ("exported" if checkpoint.has_mtp else checkpoint.mtp_note or
                         ("left out (--no-mtp)" if not self.options.mtp else "the checkpoint has none"))
        return checkpoint

    def prepare(self, checkpoint: Checkpoint, activations: str, folder: Path, stages: Stages) -> Traced:
        logits = "all" if self.options.all_logits else "last"
        dtype = DTYPES[activations]
        if self.options.stream_weights:
            model = checkpoint.build_skeleton(dtype, logits=logits)
            head = checkpoint.build_mtp_skeleton(dtype) if checkpoint.has_mtp else None
        else:
            model = checkpoint.build_decoder(dtype, logits=logits)
            head = checkpoint.build_mtp(dtype) if checkpoint.has_mtp else None
        step = None if head is None else MTPDraftStep(model.cfg, head, model.lm_head)
        form, draftable = self.options.recurrent_ops, step is not None

        weights = self._streamed(model)

        def trace() -> Traced:
            vision_dir = vision = None
            if checkpoint.vision is not None:  # traced beside the decoder, in a helper process
                vision_dir = folder / f".vision-{activations}"
                vision_dir.mkdir()
                vision = VisionTrace(checkpoint.folder, activations, vision_dir)
            try:
                traced = Traced(trace_embed(model, weights), trace_decoder(model, form, draftable, weights),
                                None if step is None else trace_mtp(step, self._streamed(step)), vision_dir)
                if vision is not None:
                    vision.wait()
            finally:
                if vision is not None:
                    vision.stop()
            return traced

        return stages.run(trace)

    def _streamed(self, module: torch.nn.Module) -> StreamedWeights | None:
        """The placeholders of a skeleton module (None when the weights are in memory)."""
        if not self.options.stream_weights:
            return None
        return StreamedWeights(self.checkpoint, {
            name: (self.checkpoint.source_name(name), tuple(p.shape))
            for name, p in module.named_parameters(remove_duplicate=False) if is_placeholder(name, tuple(p.shape))})

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
        if traced.mtp is not None:
            mtp = traced.mtp.clone()
            if scheme.weight_bits is not None:
                quantize_projections(mtp, scheme, self.options.quant)
            name_nodes_and_strip_trace_metadata(mtp)
            save_graph(mtp, folder / scheme.mtp_file, self.sinks)
        record = _variant_record(scheme, self.options.quant, folder, self.cfg)
        if traced.vision_dir is not None:
            patch_dim = self.checkpoint.vision.patch_dim
            record.update(write_vision_variant(traced.vision_dir, scheme, folder, self.options.quant, patch_dim))
            record["vision_bytes_on_disk"] = files_bytes(folder, [scheme.vision_file, scheme.vision_file + "_data"])
        self.written.append((scheme.name, record))
        return record

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
        """The one pass over the checkpoint that fills every variant's streamed weights; then each
        variant is completed (`_complete`)."""
        if self.options.stream_weights:
            def write(report: Callable[[int, int], None]) -> None:
                stream_weights(self.checkpoint, self.sinks, report)
                self._complete(folder)

            stages.run_with_progress(write, sum(s.tensor.nbytes for s in self.sinks), len(self.sinks))
        else:
            self._complete(folder)
        self.sinks = []

    def _complete(self, folder: Path) -> None:
        """With every byte written: the MTP graph reads the LM head from the decoder's data file (the
        first --draft-vocab rows of it, if given), and each record gets its size and fingerprint."""
        tokens = self.options.draft_vocab
        for name, record in self.written:
            if "mtp" in record:
                share_identical_weights(folder / record["mtp"], folder / record["decoder"])
                limited = tokens and limit_draft_vocab(folder / record["mtp"], tokens)
                if limited:
                    record["draft_vocab"] = limited
                elif tokens:
                    why = (f"the vocabulary has no more than {tokens} tokens" if "weight_bits" in record else
                           "its LM head is float, stored transposed, so only int4/int8 heads are limited")
                    print(f"note: --draft-vocab {tokens} does not apply to variant {name}: {why}", file=sys.stderr)
            _complete_record(record, folder)
        self.written = []

    def release(self, traced: Traced) -> None:
        traced.embed = traced.decoder = traced.mtp = None
        if traced.vision_dir is not None:
            shutil.rmtree(traced.vision_dir)

    def manifest_fields(self, cfg: TextConfig) -> dict:
        form = RECURRENT_FORMS[self.options.recurrent_ops]
        return {
            "recurrent_ops": form.name,
            "recurrent_ops_domain": form.domain or "ai.onnx",
            "min_onnxruntime": form.min_onnxruntime,
            "logits": "all positions" if self.options.all_logits else "last position",
            "mtp_head": self.mtp_note,
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
    mtp = {"mtp": scheme.mtp_file} if (root / scheme.mtp_file).is_file() else {}
    record = {"embed_tokens": embed, "decoder": decoder, **mtp,
              "activations": scheme.activations,
              "opset_imports": opset_imports(onnx.load(str(root / decoder), load_external_data=False))}
    if scheme.weight_bits:
        record.update(weight_bits=scheme.weight_bits, block_size=quant.block_size, symmetric=quant.symmetric,
                      accuracy_level=quant.accuracy_level,
                      weight_formats=scheme.family_formats(expected_shapes(cfg), quant))
    return record


def _complete_record(record: dict, root: Path) -> None:
    """A written variant's size on disk and fingerprint (what a saved state is tied to)."""
    files = variant_files(root, record)
    record["bytes_on_disk"] = files_bytes(root, files)
    record["fingerprint"] = fingerprint_files(root, files)


def export_onnx(checkpoint: str | Path, out: Path, schemes: str = "fp32", options: OnnxOptions = OnnxOptions(), *,
                force: bool = False, progress: bool = True) -> Path:
    """`qwen-edge export CHECKPOINT OUT --quant SCHEMES` from Python."""
    from exporter.pipeline import ExportRequest, run_export
    from quant.schemes import parse_schemes

    return run_export(ExportRequest(checkpoint, out, tuple(parse_schemes(schemes)), force, progress), OnnxBackend(options))
