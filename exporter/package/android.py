"""The Android side of `qwen-edge package`: one graph per variant that both ONNX Runtime and
onnxruntime-genai load, its ORT-format twin, the operator list of a reduced ORT build, genai_config.json.

Why one merged graph. onnxruntime-genai 0.18 runs Qwen3.5 as model type `qwen3_5_text`, whose decoder
must take `input_ids` (it reports "Model input was not found: input_ids" for our `inputs_embeds`
decoder); its only route to a separate embedding graph is the vision-language pipeline (`qwen3_5`),
which also needs a vision encoder. So the bundle carries `onnx/model{suffix}.onnx`: embed_tokens
merged in front of the decoder (input `input_ids`, every other input and output as in the export).
Plain ONNX Runtime loads the same file, so no weight is shipped twice; genai_config.json maps the
state names (the %d patterns of graphs/state.py) instead of renaming them.

Layout written into the bundle (per variant, suffix as in the export):
    onnx/model{suffix}.onnx (+ .onnx_data)   merged graph, recurrent ops in com.microsoft
    onnx/model{suffix}.ort                   ORT format, basic optimizations (portable across CPUs)
    required_operators.config                what a reduced ORT build must contain, for all .ort files
    genai_config.json                        onnxruntime-genai configuration of the first variant
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort

from exporter.onnx.external_data import relocate
from exporter.onnx.forms import as_plain_decoder, to_contrib
from exporter.package.manifest import load_graph
from graphs.config import TextConfig, TokenIds, declared_token_ids
from graphs.errors import QwenEdgeError
from graphs.state import name_patterns

DATA_ALIGNMENT = 4096  # each tensor starts on a page, so ORT can map it
GENAI_MODEL_TYPE = "qwen3_5_text"
OPERATORS_CONFIG = "required_operators.config"
ORT_FORMAT_LIMIT = 2**31  # an .ort file is one flatbuffer, weights included
log = logging.getLogger(__name__)


def merged_name(decoder_name: str) -> str:
    """`onnx/decoder_model_merged_q4.onnx` -> `onnx/model_q4.onnx`."""
    path = Path(decoder_name)
    return str(path.with_name("model" + path.stem.removeprefix("decoder_model_merged") + path.suffix))


def merge_embedding(embed_path: Path, decoder_path: Path, out_path: Path) -> bool:
    """Write embed_tokens -> decoder as one graph at `out_path` with one data file beside it.

    Works on the graph protos only: weight bytes are streamed from the source data files into
    `<out>.onnx_data` and the external-data offsets rewritten, so no weight is loaded into memory
    and tensors that already share bytes (a tied embedding reading the LM head) still share them.
    Returns True when the recurrent ops had to be moved to com.microsoft.
    """
    embed, decoder = (load_graph(p, "re-run 'qwen-edge export'") for p in (embed_path, decoder_path))
    if "inputs_embeds" not in [i.name for i in decoder.graph.input]:
        raise QwenEdgeError(f"{decoder_path}: has no 'inputs_embeds' input; package a folder written by 'qwen-edge export'")
    converted = to_contrib(decoder)
    as_plain_decoder(decoder)
    _check_same_default_opset(embed, decoder, embed_path)
    clash = {t.name for t in embed.graph.initializer} & {t.name for t in decoder.graph.initializer}
    if clash:
        raise QwenEdgeError(f"{embed_path}: initializer names also used by the decoder ({', '.join(sorted(clash))})")

    graph = decoder.graph
    inputs = [i for i in graph.input if i.name != "inputs_embeds"]
    del graph.input[:]
    graph.input.extend([*embed.graph.input, *inputs])
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend([*embed.graph.node, *nodes])
    graph.name = "model"
    imports = {o.domain: o.version for o in decoder.opset_import}
    for o in embed.opset_import:
        if o.domain not in ("", "ai.onnx"):
            imports[o.domain] = max(imports.get(o.domain, 0), o.version)
    del decoder.opset_import[:]
    decoder.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in sorted(imports.items()))
    decoder.ir_version = max(decoder.ir_version, embed.ir_version)
    decoder.graph.doc_string = "Qwen3.5 token embedding + hybrid decoder, input_ids in (qwen-edge package)"

    own = len(graph.initializer)
    graph.initializer.extend(embed.graph.initializer)
    sources = [(t, decoder_path.parent) for t in graph.initializer[:own]]
    sources += [(t, embed_path.parent) for t in graph.initializer[own:]]
    relocate(sources, out_path.parent, out_path.name + "_data", align=DATA_ALIGNMENT)
    onnx.save(decoder, str(out_path))
    return converted


def _check_same_default_opset(embed: onnx.ModelProto, decoder: onnx.ModelProto, embed_path: Path) -> None:
    """The merged graph keeps the decoder's default opset; each embedding op must mean the same there."""
    target = next(o.version for o in decoder.opset_import if o.domain in ("", "ai.onnx"))
    own = next((o.version for o in embed.opset_import if o.domain in ("", "ai.onnx")), target)
    for node in embed.graph.node:
        if node.domain in ("", "ai.onnx"):
            if (onnx.defs.get_schema(node.op_type, own, "").since_version
                    != onnx.defs.get_schema(node.op_type, target, "").since_version):
                raise QwenEdgeError(f"{embed_path}: {node.op_type} differs between opset {own} and the decoder's "
                                    f"opset {target}; re-export both graphs with one qwen-edge version")


# ONNX Runtime's own conversion (what `convert_onnx_models_to_ort` does per model), run in a child process.
_TO_ORT = """
import sys
import onnxruntime as ort
options = ort.SessionOptions()
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
options.intra_op_num_threads = options.inter_op_num_threads = 1
options.optimized_model_filepath = sys.argv[2]
options.add_session_config_entry("session.save_model_format", "ORT")
options.add_session_config_entry("session.qdqisint8allowed", "0")
ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
"""
_ADDR_NO_RANDOMIZE = 0x0040000  # Linux personality flag (what `setarch -R` sets)


def _fixed_addresses() -> None:
    """In the child before exec: turn off address-space randomization (Linux; elsewhere a no-op)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.personality(libc.personality(0xFFFFFFFF) | _ADDR_NO_RANDOMIZE)
    except (OSError, AttributeError):
        pass


def write_ort_format(onnx_path: Path) -> Path:
    """`<name>.ort` beside `onnx_path`, with basic optimizations only.

    Basic optimizations are hardware-independent (constant folding, redundant-node removal); the
    'extended'/'all' levels fuse for the converting machine's CPU, and such a file may not run on a
    phone. Reproducible bytes: ORT 1.32 writes the kernel-type table of the .ort file in an order
    that follows heap addresses (measured: three conversions of one graph, three different hashes,
    same content). So the conversion runs in a child process with one thread, address-space
    randomization off, a fixed hash seed, an empty environment and fixed-length paths, which gives
    identical bytes on every run (Linux; elsewhere that table's byte layout may still vary).
    """
    target = onnx_path.with_suffix(".ort")
    data = onnx_path.with_name(onnx_path.name + "_data")
    size = onnx_path.stat().st_size + (data.stat().st_size if data.is_file() else 0)
    if size >= ORT_FORMAT_LIMIT:
        raise QwenEdgeError(f"{onnx_path}: {size / 2**30:.1f} GiB of graph and weights; the ORT format holds at most "
                            "2 GiB (a flatbuffer); package a quantized variant, e.g. --variants q4")
    # The child sees the same paths, environment and working directory on every run: a fresh temporary
    # folder (same name length each time) holding links to the graph and its data.
    with tempfile.TemporaryDirectory(prefix="qwen-edge-ort-") as tmp:
        for path in (onnx_path, data):
            if path.is_file():
                os.symlink(path.resolve(), Path(tmp) / path.name)
        run = subprocess.run([sys.executable, "-I", "-c", _TO_ORT, onnx_path.name, target.name], cwd=tmp,
                             env={"PYTHONHASHSEED": "0"}, capture_output=True, text=True,
                             preexec_fn=_fixed_addresses if sys.platform == "linux" else None)
        if run.returncode != 0 or not (Path(tmp) / target.name).is_file():
            detail = (run.stderr.strip().splitlines() or ["no output"])[-1]
            raise QwenEdgeError(f"{onnx_path}: ONNX Runtime {ort.__version__} cannot convert it to ORT format ({detail})")
        shutil.move(Path(tmp) / target.name, target)
    return target


def write_operators_config(ort_paths: list[Path], root: Path) -> Path:
    """`required_operators.config` for a reduced ORT build (tools/ci_build/build.py --include_ops_by_config)."""
    from onnxruntime.tools.ort_format_model import create_config_from_models

    target = root / OPERATORS_CONFIG
    tool_log = logging.getLogger("ort_format_model.utils")  # it logs every file it writes at INFO
    level = tool_log.level
    tool_log.setLevel(logging.WARNING)
    try:
        create_config_from_models(sorted(ort_paths), target, False)
    finally:
        tool_log.setLevel(level)
    # The tool lists the source files by absolute path; name them inside the bundle instead.
    lines = target.read_text().splitlines()
    for i, line in enumerate(lines):
        for path in ort_paths:
            if line == f"# - {path}":
                lines[i] = f"# - {path.relative_to(root).as_posix()}"
    target.write_text("\n".join(lines) + "\n")
    return target


# genai's pad id. onnxruntime-genai 0.18 (qwen3_5_text) treats every prompt token equal to
# pad_token_id as padding, even at batch size 1: mask 0 there, its position not advanced, every
# later position shifted (found for issue 16: with pad = eos, any prompt holding the eos id diverged
# from transformers). A prompt is tokens to run, as qwen-edge generate and transformers'
# model(input_ids) run them, so the bundle names a pad no token can equal; genai range-checks eos
# ids only.
NO_PAD_ID = -1


def genai_token_ids(ids: TokenIds, vocab_size: int, where: Path | str) -> dict:
    """eos, pad and bos as genai_config.json must hold them: integers only (genai refuses null, and a
    list for pad and bos), at least one end token in the vocabulary, a pad no prompt can contain
    (the checkpoint's pad id is not used: see NO_PAD_ID)."""
    eos = list(ids.eos)
    if not eos:  # genai needs one; the last row is an unused padding row of the published vocabularies
        eos = [vocab_size - 1]
        log.warning("%s: the checkpoint declares no eos_token_id; onnxruntime-genai needs one, so the Android "
                    "bundle stops on id %d (the last vocabulary row). Set eos_token_id in generation_config.json "
                    "to choose it.", where, eos[0])
    config = {"eos_token_id": eos, "pad_token_id": NO_PAD_ID}
    if ids.bos is not None:
        config["bos_token_id"] = ids.bos
    return config


def genai_config(cfg: TextConfig, model_file: str, generation: dict, context_length: int, token_ids: dict) -> dict:
    """onnxruntime-genai's configuration for the merged graph (model type `qwen3_5_text`).

    Search defaults come from the export's generation_config.json, token ids from `genai_token_ids`.
    State names are mapped, not renamed: genai finds each layer's tensors from the %d patterns of
    graphs/state.py. `past_present_share_buffer` is off because the graph concatenates its KV cache
    (it does not write into a preallocated max-length buffer as genai's own GroupQueryAttention graphs
    do). genai 0.18 binds each conv/recurrent state as input and output at once on CPU whatever this
    says; the com.microsoft kernels give identical states that way (checked for issue 16).
    """
    config = {
        "model": {
            "context_length": context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": model_file,
                "head_size": cfg.head_dim,
                "hidden_size": cfg.hidden_size,
                "inputs": {
                    "input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                    **{f"past_{role}_names": pattern for role, pattern in name_patterns("past").items()},
                },
                "outputs": {
                    "logits": "logits",
                    **{f"present_{role}_names": pattern for role, pattern in name_patterns("present").items()},
                },
                "num_attention_heads": cfg.num_attention_heads,
                "num_hidden_layers": cfg.num_hidden_layers,
                "num_key_value_heads": cfg.num_key_value_heads,
            },
            **token_ids,
            "type": GENAI_MODEL_TYPE,
            "vocab_size": cfg.vocab_size,
        },
        "search": {
            "do_sample": bool(generation.get("do_sample", False)), "early_stopping": True, "length_penalty": 1.0,
            "max_length": context_length, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": False,
            "repetition_penalty": float(generation.get("repetition_penalty", 1.0)),
            "temperature": float(generation.get("temperature", 1.0)), "top_k": int(generation.get("top_k", 50)),
            "top_p": float(generation.get("top_p", 1.0)),
        },
    }
    return config


def write_merged_graphs(export_dir: Path, out: Path, variants: dict[str, dict], cfg: TextConfig,
                        generation: dict, context_length: int) -> dict[str, dict]:
    """The merged graph of each variant (name -> export manifest entry) and genai_config.json (first variant).

    Returns the manifest's per-variant records: {variant: {"onnx", "converted_to_contrib"}}.
    """
    records: dict[str, dict] = {}
    for name, entry in variants.items():
        model = out / merged_name(entry["decoder"])
        model.parent.mkdir(parents=True, exist_ok=True)
        converted = merge_embedding(export_dir / entry["embed_tokens"], export_dir / entry["decoder"], model)
        records[name] = {"onnx": model.relative_to(out).as_posix(), "converted_to_contrib": converted}
    first = records[next(iter(variants))]["onnx"]
    token_ids = genai_token_ids(declared_token_ids(export_dir, cfg.vocab_size), cfg.vocab_size, export_dir)
    config = genai_config(cfg, first, generation, context_length, token_ids)
    (out / "genai_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return records


def write_onnx_graphs(export_dir: Path, out: Path, variants: dict[str, dict], cfg: TextConfig, generation: dict,
                      context_length: int) -> dict[str, dict]:
    """The graphs onnxruntime-genai loads (Android and iOS): the merged graphs, or for an export with a
    vision tower the vision-language pipeline's three graphs (exporter/package/android_vision.py)."""
    if any("vision_encoder" in entry for entry in variants.values()):
        return _write_vision_pipeline(export_dir, out, variants, cfg, generation, context_length)
    return write_merged_graphs(export_dir, out, variants, cfg, generation, context_length)


def write_android(export_dir: Path, out: Path, variants: dict[str, dict], cfg: TextConfig, generation: dict,
                  context_length: int) -> dict[str, dict]:
    """`write_onnx_graphs`, their ORT-format twins and the operator list; records gain the "ort" paths."""
    records = write_onnx_graphs(export_dir, out, variants, cfg, generation, context_length)
    ort_paths = []
    for record in records.values():
        for role in ("vision", "embedding", "decoder", "onnx"):
            if role in record:
                key = "ort" if role == "onnx" else f"{role}_ort"
                ort_paths.append(write_ort_format(out / record[role]))
                record[key] = ort_paths[-1].relative_to(out).as_posix()
    write_operators_config(ort_paths, out)
    return records


def _write_vision_pipeline(export_dir: Path, out: Path, variants: dict[str, dict], cfg: TextConfig,
                           generation: dict, context_length: int) -> dict[str, dict]:
    from exporter.package.android_vision import write_vision_graphs
    from graphs.config import load_vision_config
    from runtime_py.vision_preprocess import PixelSettings, processor_dicts

    first = next(iter(variants.values()))
    token_ids = genai_token_ids(declared_token_ids(export_dir, cfg.vocab_size), cfg.vocab_size, export_dir)
    text = genai_config(cfg, merged_name(first["decoder"]), generation, context_length, token_ids)
    settings = PixelSettings.from_dict(processor_dicts(export_dir)[0])
    return write_vision_graphs(export_dir, out, variants, load_vision_config(export_dir), settings, text)
