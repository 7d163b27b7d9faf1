"""What a new user meets first (issue 18): optional parts missing, progress in CI logs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from exporter.cli import main

ROOT = Path(__file__).resolve().parent.parent
# As if the named packages were not installed: their import fails and importlib.util.find_spec gives None.
WITHOUT = """
import sys
for name in sys.argv[1].split(','):
    sys.modules[name] = None
from exporter.cli import main
main(sys.argv[2:])
"""


def _without(packages: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT, packages, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_bench_without_matplotlib_keeps_its_results(default_export, tmp_path):
    out = tmp_path / "bench"
    done = _without("matplotlib", "bench", str(default_export), "--threads", "1", "--prompt-lengths", "8",
                    "--decode-tokens", "4", "--repeats", "1", "--contexts", "1024", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "bench.json").is_file() and (out / "bench.md").is_file() and not list(out.glob("*.png"))
    assert done.stderr.strip().splitlines() == [
        "plots skipped: matplotlib is not installed (pip install 'qwen-edge[bench]' for them)"]


def test_core_ml_without_coremltools_is_one_clear_error(tmp_path):
    done = _without("coremltools", "export", "--format", "coreml", "default", str(tmp_path / "out"), "--quiet")
    assert done.returncode == 1 and not (tmp_path / "out").exists()
    assert done.stderr.startswith("error: --format coreml needs coremltools") and done.stderr.count("\n") == 1


def test_stage_lines_when_stderr_is_not_a_terminal(tiny_checkpoints, tmp_path):
    """A CI log gets one line per stage with its elapsed time and peak memory (a terminal gets the bar)."""
    result = CliRunner().invoke(main, ["export", str(tiny_checkpoints["kv_equal_tied"]), str(tmp_path / "out"),
                                       "--quant", "fp32,q4"])
    assert result.exit_code == 0, result.output
    lines = result.stderr.strip().splitlines()
    stages = ["check checkpoint", "load", "trace float32 graphs", "write fp32", "write q4", "write weights",
              "copy tokenizer"]
    assert len(lines) == len(stages)
    for n, (line, stage) in enumerate(zip(lines, stages), start=1):
        pattern = rf"export \[{n}/{len(stages)}\] {stage}: \d+\.\d s \(peak RSS [\d,]+ MiB(; [^)]+)?\)"
        assert re.fullmatch(pattern, line), line
