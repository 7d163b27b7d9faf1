"""Benchmark: the vision tower of a real Qwen3.5 shape (random weights): ONNX export of every variant,
file sizes, the 4-bit gate's measured error, and the time to encode one 448×448 image.

    .venv/bin/python -m exporter.bench.vision --preset qwen3.5-0.8b [--quant fp32,fp16,q8,q4,q4f16]

The tower is exported exactly as `qwen-edge export` exports it (exporter/onnx/vision.py) but alone, so
the run does not pay for the decoder (whose export the export benchmark measures). Encode time is
the median of 5 ONNX Runtime runs after one warm-up, per thread count, pixels from a synthetic image
through runtime_py's preprocessing. Results go to bench_out/vision_<preset>.json and BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from exporter.bench.export import ROOT, machine, replace_section
from exporter.onnx.streamed import save_graph
from exporter.onnx.vision import FLOAT_NAME, trace_vision, write_vision_variant
from graphs.config import preset_config_dict, vision_config_from_dict
from graphs.random_checkpoint import random_vision_block
from graphs.vision import VisionEncoder, vision_parameter_shapes
from quant.schemes import VISION_FALLBACK_BITS, QuantOptions, parse_schemes
from runtime_py.vision_preprocess import PUBLISHED_IMAGE, PixelSettings, preprocess_image

IMAGE_SIZE = 448


def random_tower(preset: str, seed: int = 0) -> VisionEncoder:
    cfg = vision_config_from_dict(preset_config_dict(preset))
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = VisionEncoder(cfg)
    params = {n: random_vision_block(n, s, gen) for n, s in vision_parameter_shapes(cfg).items()}
    model.load_state_dict(params, strict=True, assign=True)
    return model.eval()


def encode_seconds(path: Path, pixels: np.ndarray, grid: np.ndarray, threads: int, repeats: int = 5) -> float:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feeds = {"pixel_values": pixels, "image_grid_thw": grid}
    session.run(None, feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(preset: str, quant: str, threads: tuple[int, ...]) -> dict:
    load_before = os.getloadavg()[0]
    schemes = parse_schemes(quant)
    tower = random_tower(preset)
    params = sum(p.numel() for p in tower.parameters())
    with tempfile.TemporaryDirectory(prefix="qwen-edge-vision-bench-") as tmp:
        tmp = Path(tmp)
        image = tmp / "image.png"
        y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
        from PIL import Image

        Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)).save(image)
        visual = preprocess_image(image, PixelSettings.from_dict(PUBLISHED_IMAGE))
        grid = np.array([visual.grid], np.int64)
        rows, traced = [], {}
        for scheme in schemes:
            if scheme.activations not in traced:
                float_dir = tmp / f"float-{scheme.activations}"
                float_dir.mkdir()
                if scheme.activations == "float16":
                    tower.half()
                start = time.perf_counter()
                save_graph(trace_vision(tower), float_dir / FLOAT_NAME)
                traced[scheme.activations] = (float_dir, round(time.perf_counter() - start, 1))
            float_dir, trace_s = traced[scheme.activations]
            (tmp / "onnx").mkdir(exist_ok=True)
            start = time.perf_counter()
            record = write_vision_variant(float_dir, scheme, tmp, QuantOptions(), tower.cfg.patch_dim)
            write_s = round(time.perf_counter() - start, 1)
            path = tmp / record["vision_encoder"]
            size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
            rows.append({"variant": scheme.name, "file": record["vision_encoder"], "mib": round(size / 2**20, 1),
                         "weight_bits": record.get("vision_weight_bits"),
                         "int4_feature_error": record.get("vision_int4_feature_error"),
                         "trace_s": trace_s, "write_s": write_s,
                         "encode_448_s": {t: round(encode_seconds(path, visual.pixel_values, grid, t), 3)
                                          for t in threads}})
    return {"preset": preset, "parameters": params, "image": f"{IMAGE_SIZE}x{IMAGE_SIZE}",
            "grid": list(visual.grid), "image_tokens": visual.tokens, "rows": rows,
            "date": dt.date.today().isoformat(), "machine": machine(),
            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def markdown(report: dict, command: str) -> str:
    threads = list(report["rows"][0]["encode_448_s"])
    load = report["load_average"]
    lines = [f"## Vision tower of the {report['preset']} shape (random weights): export and 448×448 encode", "",
             f"{report['parameters'] / 1e6:.1f} M parameters; a {report['image']} image is grid {report['grid']} "
             f"({report['image_tokens']} image tokens). {report['date']}, {report['machine']}; 1-minute load average "
             f"{load[0]} at the start, {load[1]} at the end (times from a loaded machine are upper bounds). "
             "Command: `" + command + "`.", "",
             "| variant | file | MiB | tower weights | int4 feature error (gate 0.1) | trace s | write s | "
             + " | ".join(f"encode 448² s, {t} thr" for t in threads) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(threads)]
    for r in report["rows"]:
        bits = f"{r['weight_bits']}-bit" if r["weight_bits"] else "float"
        err = "" if r["int4_feature_error"] is None else f"{r['int4_feature_error']:.4f}"
        lines.append(f"| {r['variant']} | `{r['file']}` | {r['mib']} | {bits} | {err} | {r['trace_s']} | {r['write_s']} | "
                     + " | ".join(str(r["encode_448_s"][t]) for t in threads) + " |")
    fell_back = [r["variant"] for r in report["rows"] if r["int4_feature_error"] is not None and r["weight_bits"] != 4]
    if fell_back:
        lines += ["", f"{', '.join(fell_back)}: the int4 tower's feature error is above the 0.1 gate, so these "
                  f"variants store the tower in {VISION_FALLBACK_BITS} bits (exporter/onnx/vision.py)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True)
    parser.add_argument("--quant", default="fp32,fp16,q8,q4,q4f16")
    parser.add_argument("--threads", default="1,2")
    args = parser.parse_args()
    threads = tuple(int(t) for t in args.threads.split(","))
    report = run(args.preset, args.quant, threads)
    out = ROOT / "bench_out"
    out.mkdir(exist_ok=True)
    (out / f"vision_{args.preset}.json").write_text(json.dumps(report, indent=2) + "\n")
    command = f".venv/bin/python -m exporter.bench.vision --preset {args.preset} --quant {args.quant}"
    replace_section(ROOT / "BENCHMARKS.md", f"vision-{args.preset}", markdown(report, command))
    print(markdown(report, command))


if __name__ == "__main__":
    main()
