"""Device profiles carry sources; the fit and speed estimates follow the documented arithmetic."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from devices.fit import bytes_per_token, calibrate_efficiency, estimate_tok_s, fit
from devices.profiles import DEVICES, Device, Sourced
from exporter.cli import main

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


def test_devices_cli(default_export, tmp_path):
    listing = CliRunner().invoke(main, ["devices", "list"])
    assert listing.exit_code == 0 and "Raspberry Pi 5" in listing.output and "https://" in listing.output
    out = tmp_path / "fit.json"
    result = CliRunner().invoke(main, ["devices", "fit", str(default_export), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "ESTIMATES" in result.output
    data = json.loads(out.read_text())
    assert len(data["estimates"]) == len(DEVICES)  # one variant in this export
    pi = next(e for e in data["estimates"] if e["device"].startswith("Raspberry"))
    assert pi["fits"] is True and pi["decode_tok_s"] > 0
