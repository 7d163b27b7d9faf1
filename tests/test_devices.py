"""Device profiles carry sources; the fit and speed estimates follow the documented arithmetic."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from devices.fit import bytes_per_token, calibrate_efficiency, estimate_tok_s, fit
from devices.profiles import DEVICES, PROFILE_FIELDS, Device, Sourced
from exporter.cli import main
from graphs.config import load_text_config
from graphs.state import state_tensors
from runtime_py.export_format import read_manifest

REQUIRED = {"iPhone 15 Pro", "iPhone 16 Pro", "Pixel 8", "Galaxy S24", "Galaxy A15 5G (6 GB)",
            "Raspberry Pi 5 (8 GB)", "MacBook Air M1 (8 GB)"}


def test_every_required_device_and_every_number_has_a_source():
    assert {d.name for d in DEVICES} == REQUIRED
    for d in DEVICES:
        for field in ("ram_gb", "app_memory_gb", "bandwidth_gb_s", "performance_cores", "npu", "sustained_power_w"):
            v = getattr(d, field)
            assert (v.value is None) == (v.source is None), (d.name, field)  # known <=> sourced
            if v.source:
                assert v.source.startswith("https://"), (d.name, field)


def _device(app=None, ram=8, bw=50.0, power=5.0):
    s = lambda x: Sourced(x, None if x is None else "https://example.org")  # noqa: E731
    return Device("test", "soc", s(ram), s(app), s(bw), s(4), s("npu"), s(power))


def test_estimate_arithmetic():
    per_token = bytes_per_token(weight_bytes=400_000_000, fixed_state_bytes=20_000_000, kv_bytes=10_000_000)
    assert per_token == 450_000_000
    efficiency = calibrate_efficiency(measured_tok_s=10.0, per_token_bytes=per_token, host_bandwidth_gb_s=15.0)
    assert efficiency == pytest.approx(0.3)
    assert estimate_tok_s(efficiency, 60.0, per_token) == pytest.approx(40.0)  # 4x the bandwidth, 4x the speed
    r = fit(_device(app=3, bw=60.0, power=6.0), "q4", model_bytes=2_900_000_000, state_total_bytes=50_000_000,
            per_token_bytes=per_token, efficiency=efficiency)
    assert r.budget_kind == "app limit" and r.fits is True
    assert r.decode_tok_s == pytest.approx(40.0) and r.joules_per_token == pytest.approx(6.0 / 40.0)
    r = fit(_device(app=3), "fp32", 3_100_000_000, 0, per_token, efficiency)
    assert r.fits is False


def test_unknowns_stay_unknown():
    r = fit(_device(app=None, ram=None, bw=None, power=None), "q4", 1, 1, 1, 0.5)
    assert r.fits is None and r.budget_kind == "unknown" and r.decode_tok_s is None and r.joules_per_token is None
    r = fit(_device(app=None, ram=6, bw=None), "q4", 1, 1, 1, 0.5)
    assert r.budget_kind == "total RAM" and r.fits is True and r.decode_tok_s is None


def test_devices_list_shows_every_number_with_its_source():
    listing = CliRunner().invoke(main, ["devices", "list"])
    assert listing.exit_code == 0, listing.output
    lines = listing.output.splitlines()
    for d in DEVICES:
        block = lines[lines.index(f"{d.name} ({d.soc})") + 1:][:len(PROFILE_FIELDS)]
        for line, field in zip(block, PROFILE_FIELDS):
            v = getattr(d, field)
            assert line.startswith(f"  {field}: {'unknown' if v.value is None else v.value}"), line
            assert f"— {v.source or 'no source'} ({v.confidence}" in line, line


def test_devices_fit_follows_the_formula(default_export, tmp_path):
    context = 512
    out = tmp_path / "fit.json"
    result = CliRunner().invoke(main, ["devices", "fit", str(default_export), "--context", str(context),
                                       "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    variants = read_manifest(default_export)["variants"]
    cfg = load_text_config(default_export)
    state = sum(int(np.prod(t.shape(1, context))) * np.dtype(t.dtype()).itemsize for t in state_tensors(cfg))
    measured = {m["variant"]: m for m in data["measured"]}
    assert set(measured) == set(variants) and len(data["estimates"]) == len(DEVICES) * len(variants)
    by_name = {d.name: d for d in DEVICES}
    for e in data["estimates"]:
        device, m = by_name[e["device"]], measured[e["variant"]]
        assert e["needed_bytes"] == variants[e["variant"]]["bytes_on_disk"] + state
        bandwidth = device.bandwidth_gb_s.value
        if bandwidth is None:
            assert e["decode_tok_s"] is None
        else:
            assert e["decode_tok_s"] == pytest.approx(m["efficiency"] * bandwidth * 1e9 / m["per_token_bytes"])
        assert e["fits"] == (None if e["budget_bytes"] is None else e["needed_bytes"] <= e["budget_bytes"])
        assert f"{e['device']:<24} {e['variant']:<7}" in result.output
    assert m["tok_s"] > 0 and m["efficiency"] > 0
