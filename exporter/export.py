"""`qwen-edge export`: a checkpoint folder in, an app-ready ONNX export folder out.

Output layout (onnx-community Qwen3.5):
    OUT/config.json, generation_config.json, tokenizer.json, tokenizer_config.json, ...
    OUT/onnx/embed_tokens.onnx (+ .onnx_data)
    OUT/onnx/decoder_model_merged.onnx (+ .onnx_data)
    OUT/qwen_edge.json   what was exported, how, and by which version
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import click
import onnx
import onnx_ir as ir
import onnxruntime

from exporter.atomic import atomic_output_dir, check_destination
from exporter.onnx_export import name_nodes_and_strip_trace_metadata, save_graph, trace_decoder, trace_embed
from exporter.onnx_recurrent import DOMAINS
from graphs.checkpoint import open_checkpoint
from quant.onnx_weights import pack_blockwise, quantize_projections, quantized_embed_graph, share_lm_head_bytes
from quant.schemes import SCHEMES, QuantOptions, Scheme
from runtime_py.session import MANIFEST

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "default_model" / "checkpoint"
SUPPORT_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt", "preprocessor_config.json",
)
# Oldest ONNX Runtime that runs each form of the recurrent ops (see exporter/onnx_recurrent.py).
MIN_ORT = {"standard": "1.32", "contrib": "1.25"}


def qwen_edge_version() -> str:
    try:
        return version("qwen-edge")
    except PackageNotFoundError:
        return "0+unknown"


def resolve_checkpoint(name: str | Path) -> Path:
    """'default' names the embedded default model; anything else is a folder path."""
    return DEFAULT_MODEL_DIR if str(name) == "default" else Path(name)


class Stages:
    """A progress bar over the named stages of a long job (on stderr, so stdout stays clean)."""

    def __init__(self, names: list[str], enabled: bool) -> None:
        self.names, self.done = names, 0
        self.bar = click.progressbar(length=len(names), label="export", file=sys.stderr,
                                     item_show_func=lambda _: self.current, show_eta=False) if enabled else None
        self.current = names[0]
        if self.bar:
            self.bar.__enter__()
            self.bar.render_progress()

    def run(self, fn: Callable[[], object]) -> object:
        self.current = self.names[self.done]
        if self.bar:
            self.bar.render_progress()
        try:
            result = fn()
        except BaseException:
            if self.bar:  # end the bar's line so the error message stands on its own line
                click.echo(err=True)
            raise
        self.done += 1
        if self.bar:
            self.bar.update(1)
            if self.done == len(self.names):
                self.bar.__exit__(None, None, None)
        return result


def _copy_support_files(src: Path, dst: Path) -> list[str]:
    """Tokenizer, chat template and configs a client needs beside the graphs."""
    names = [n for n in SUPPORT_FILES if (src / n).is_file()]
    for name in names:
        shutil.copy2(src / name, dst / name)
    return names


def opset_imports(model: onnx.ModelProto) -> dict[str, int]:
    """{domain: version} of a graph, the default domain named "ai.onnx" (as manifests record it)."""
    return {o.domain or "ai.onnx": o.version for o in model.opset_import}


def _write_quantized(scheme: Scheme, float_dir: Path, out_dir: Path, opts: QuantOptions, tied: bool) -> None:
    """Quantize the saved float graphs of the scheme's activation dtype into the scheme's files."""
    embed_name, decoder_name = scheme.files
    decoder = ir.load(float_dir / "decoder.onnx")
    lm_head = quantize_projections(decoder, scheme.weight_bits, opts)
    name_nodes_and_strip_trace_metadata(decoder)
    decoder_path = save_graph(decoder, out_dir / decoder_name)
    doc = f"Qwen3.5 token embedding, {scheme.name} (qwen-edge)"
    if tied:  # the gather reads the LM head's quantized bytes from the decoder's data file
        embed = quantized_embed_graph(lm_head, lm_head.k, doc)
        share_lm_head_bytes(embed, decoder_path, scheme.weight_bits)
        onnx.save(embed, str(out_dir / embed_name))
    else:
        table = onnx.numpy_helper.to_array(onnx.load(str(float_dir / "embed.onnx")).graph.initializer[0])
        packed = pack_blockwise(table.T, scheme.weight_bits, opts)
        embed = quantized_embed_graph(packed, packed.k, doc)
        onnx.save(embed, str(out_dir / embed_name), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=Path(embed_name).name + "_data", size_threshold=1024)


def export_checkpoint(
    checkpoint: str | Path,
    out: Path,
    *,
    recurrent_ops: str = "standard",
    schemes: list[Scheme] | None = None,
    quant: QuantOptions = QuantOptions(),
    all_logits: bool = False,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Export `checkpoint` into `out` (atomically), one file pair per scheme. Returns `out`.

    Each activation dtype is traced once; quantized schemes are transforms of that float graph.
    """
    if recurrent_ops not in DOMAINS:
        raise ValueError(f"recurrent ops must be one of {sorted(DOMAINS)}")
    schemes = schemes or [SCHEMES["fp32"]]
    folder = resolve_checkpoint(checkpoint)
    out = Path(out)
    check_destination(out, force)
    dtypes = [d for d in ("float32", "float16") if any(s.activations == d for s in schemes)]
    stage_names = ["check checkpoint", "load weights"]
    for dtype in dtypes:
        stage_names.append(f"trace {dtype} graphs")
        stage_names += [f"write {s.name}" for s in schemes if s.activations == dtype]
    stages = Stages([*stage_names, "copy tokenizer"], progress)
    ck = stages.run(lambda: open_checkpoint(folder))
    with atomic_output_dir(out, force) as tmp:
        (tmp / "onnx").mkdir()
        model = stages.run(ck.build_decoder)
        for dtype in dtypes:
            if dtype == "float16":
                model = model.half()
            float_dir = tmp / f".float-{dtype}"
            float_dir.mkdir()

            def trace() -> None:
                save_graph(trace_embed(model), float_dir / "embed.onnx")
                save_graph(trace_decoder(model, recurrent_ops, all_logits), float_dir / "decoder.onnx")

            stages.run(trace)
            for scheme in (s for s in schemes if s.activations == dtype):
                if scheme.weight_bits is None:
                    stages.run(lambda s=scheme: _copy_float_graphs(float_dir, tmp, s))
                else:
                    stages.run(lambda s=scheme: _write_quantized(s, float_dir, tmp, quant, ck.config.tie_word_embeddings))
            shutil.rmtree(float_dir)
        copied = stages.run(lambda: _copy_support_files(folder, tmp))
        manifest = {
            "qwen_edge_version": qwen_edge_version(),
            "format": "onnx",
            "source_checkpoint": folder.resolve().name,
            "recurrent_ops": recurrent_ops,
            "recurrent_ops_domain": DOMAINS[recurrent_ops] or "ai.onnx",
            "min_onnxruntime": MIN_ORT[recurrent_ops],
            "logits": "all positions" if all_logits else "last position",
            "exported_with_onnxruntime": onnxruntime.__version__,
            "variants": {s.name: _variant_record(s, quant, tmp) for s in schemes},
            "support_files": copied,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def _copy_float_graphs(float_dir: Path, out_dir: Path, scheme: Scheme) -> None:
    """The float variant is the traced graph itself, re-saved under its published name."""
    for src, dst in zip(("embed.onnx", "decoder.onnx"), scheme.files):
        graph = ir.load(float_dir / src)
        name_nodes_and_strip_trace_metadata(graph)
        save_graph(graph, out_dir / dst)


def _variant_record(scheme: Scheme, quant: QuantOptions, root: Path) -> dict:
    embed, decoder = scheme.files
    record = {"embed_tokens": embed, "decoder": decoder, "activations": scheme.activations,
              "opset_imports": opset_imports(onnx.load(str(root / decoder), load_external_data=False))}
    if scheme.weight_bits:
        record.update(weight_bits=scheme.weight_bits, block_size=quant.block_size, symmetric=quant.symmetric,
                      accuracy_level=quant.accuracy_level)
    files = [root / f for name in (embed, decoder) for f in (name, name + "_data")]
    record["bytes_on_disk"] = sum(f.stat().st_size for f in files if f.is_file())
    return record
