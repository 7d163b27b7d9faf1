"""Does an export fit a device, and how fast might it decode there? An estimate, labelled as one.

Decoding a token on a CPU or NPU is memory-bound: every weight of the decoder is read once, the
recurrent and conv state is read and written, and the attention layers read their KV cache. So

    bytes_per_token = decoder weight bytes + 2 × fixed state bytes + KV-cache bytes at the context
    efficiency      = measured tok/s here × bytes_per_token / measured bandwidth here
    decode tok/s    ≈ efficiency × device peak bandwidth / bytes_per_token
    joules / token  ≈ device sustained power / estimated tok/s

The efficiency (the share of peak bandwidth this runtime turns into tokens) is calibrated on this
machine and assumed to carry over; real devices differ in cache sizes, thermal limits and kernels.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from devices.profiles import DEVICES, Device

FORMULA = ("decode tok/s ≈ efficiency × device bandwidth / bytes per token; efficiency = tok/s × bytes per token / "
           "bandwidth, measured on this machine; J/token ≈ sustained power / tok/s")


@dataclass(frozen=True)
class FitEstimate:
    device: str
    variant: str
    needed_bytes: int
    budget_bytes: int | None
    budget_kind: str  # "app limit", "total RAM" or "unknown"
    fits: bool | None
    decode_tok_s: float | None
    joules_per_token: float | None


def bytes_per_token(weight_bytes: int, fixed_state_bytes: int, kv_bytes: int) -> int:
    return weight_bytes + 2 * fixed_state_bytes + kv_bytes


def calibrate_efficiency(measured_tok_s: float, per_token_bytes: int, host_bandwidth_gb_s: float) -> float:
    return measured_tok_s * per_token_bytes / (host_bandwidth_gb_s * 1e9)


def estimate_tok_s(efficiency: float, bandwidth_gb_s: float, per_token_bytes: int) -> float:
    return efficiency * bandwidth_gb_s * 1e9 / per_token_bytes


def measure_host_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Copy bandwidth of this machine in GB/s (bytes read + written per second, best of `repeats`)."""
    src = np.ones(megabytes * 2**20 // 8, np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


def fit(device: Device, variant: str, model_bytes: int, state_total_bytes: int, per_token_bytes: int,
        efficiency: float) -> FitEstimate:
    """Fit against the app's memory limit where a source gives a number, else against total RAM.

    A text value (e.g. Android's documented lack of a per-app limit) is not a budget, so it falls back too."""
    if isinstance(device.app_memory_gb.value, (int, float)):
        budget, kind = int(float(device.app_memory_gb.value) * 1e9), "app limit"
    elif device.ram_gb.value is not None:
        budget, kind = int(float(device.ram_gb.value) * 1e9), "total RAM"
    else:
        budget, kind = None, "unknown"
    needed = model_bytes + state_total_bytes
    tok_s = None
    if device.bandwidth_gb_s.value is not None:
        tok_s = estimate_tok_s(efficiency, float(device.bandwidth_gb_s.value), per_token_bytes)
    joules = None
    if tok_s and device.sustained_power_w.value is not None:
        joules = float(device.sustained_power_w.value) / tok_s
    return FitEstimate(device.name, variant, needed, budget, kind, None if budget is None else needed <= budget,
                       tok_s, joules)


@dataclass
class FitReport:
    """`qwen-edge devices fit`: per variant what was measured here, then an estimate per device."""

    context: int
    host_bandwidth_gb_s: float
    measured: list[dict]  # per variant: tok/s here, bytes read per token, efficiency
    estimates: list[FitEstimate]

    def text(self) -> str:
        lines = [f"{m['variant']}: {m['tok_s']:.1f} tok/s here, {m['per_token_bytes'] / 2**20:.1f} MiB read per token, "
                 f"host copy bandwidth {self.host_bandwidth_gb_s:.1f} GB/s -> efficiency {m['efficiency']:.3f}"
                 for m in self.measured]
        lines.append(f"ESTIMATES ({FORMULA}); context {self.context}")
        lines.append(f"{'device':<24} {'variant':<7} {'needs MiB':>9} {'budget':>16} {'fits':>5} {'tok/s*':>8} {'J/tok*':>8}")
        for r in self.estimates:
            budget = f"{r.budget_bytes / 1e9:.0f} GB {r.budget_kind}" if r.budget_bytes else "unknown"
            fits = "?" if r.fits is None else ("yes" if r.fits else "no")
            tok = f"{r.decode_tok_s:.1f}" if r.decode_tok_s else "?"
            joules = f"{r.joules_per_token:.3f}" if r.joules_per_token else "?"
            lines.append(f"{r.device:<24} {r.variant:<7} {r.needed_bytes / 2**20:>9.1f} {budget:>16} {fits:>5} "
                         f"{tok:>8} {joules:>8}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"formula": FORMULA, "context": self.context, "host_bandwidth_gb_s": self.host_bandwidth_gb_s,
                "measured": self.measured, "estimates": [dataclasses.asdict(r) for r in self.estimates]}


def fit_export(export_dir: Path, context: int = 4096, threads: int | None = None) -> FitReport:
    """Measure each ONNX variant of `export_dir` here, calibrate, and estimate every device profile."""
    from runtime_py.bench import measure_config, state_bytes
    from runtime_py.export_format import onnx_variant_files, read_manifest
    from runtime_py.session import OnnxModel

    manifest = read_manifest(export_dir)
    bandwidth = measure_host_bandwidth()
    measured, rows = [], []
    for name, entry in manifest["variants"].items():
        _, decoder = onnx_variant_files(export_dir, name)
        data = decoder.with_name(decoder.name + "_data")
        weight_bytes = decoder.stat().st_size + (data.stat().st_size if data.is_file() else 0)
        state = state_bytes(OnnxModel(export_dir, name, threads=1), context)
        per_token = bytes_per_token(weight_bytes, state["recurrent_and_conv_bytes"], state["kv_cache_bytes"])
        run = measure_config(export_dir, name, threads or (os.cpu_count() or 1), [16], 32, 1)
        tok_s = run["decode"]["tokens_per_s"]["median"]
        efficiency = calibrate_efficiency(tok_s, per_token, bandwidth)
        measured.append({"variant": name, "tok_s": tok_s, "per_token_bytes": per_token, "efficiency": efficiency})
        rows += [fit(d, name, entry["bytes_on_disk"], state["total_bytes"], per_token, efficiency) for d in DEVICES]
    return FitReport(context, bandwidth, measured, rows)
