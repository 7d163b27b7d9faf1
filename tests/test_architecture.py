"""The import rules of ARCHITECTURE.md, checked from the source (every import, module level or inside a
function), and the torch-free commands run with `import torch` made to fail."""

from __future__ import annotations

import ast
import fnmatch
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("graphs", "quant", "runtime_py", "devices", "default_model", "exporter")

# layer -> module patterns; the first layer whose patterns match a module is its layer
LAYERS = {
    "facts": ["graphs", "graphs.errors", "graphs.file_checks", "graphs.config", "graphs.state", "graphs.io_spec", "quant", "quant.schemes",
              "runtime_py.export_format", "default_model", "exporter"],
    "runtime": ["runtime_py", "runtime_py.*", "devices", "devices.*"],
    "formats": ["exporter.onnx", "exporter.onnx.forms", "exporter.onnx.external_data", "exporter.onnx.norms", "exporter.onnx.fusions",
                "exporter.package", "exporter.package.*", "exporter.atomic", "exporter.progress", "quant.onnx_weights"],
    "model": ["graphs.*", "default_model.*"],
    "export": ["exporter.pipeline", "exporter.onnx.*", "exporter.coreml", "exporter.coreml.*", "exporter.verify",
               "exporter.verify.*", "quant.coreml_weights", "quant.dequantized"],
    "bench": ["exporter.bench", "exporter.bench.*"],
    "cli": ["exporter.cli", "exporter.cli_types"],
}
MAY_IMPORT = {
    "facts": {"facts"},
    "runtime": {"facts", "runtime"},
    "formats": {"facts", "runtime", "formats"},
    "model": {"facts", "model"},
    "export": {"facts", "runtime", "formats", "model", "export"},
    "bench": {"facts", "runtime", "formats", "model", "export", "bench"},
    "cli": set(LAYERS),
}
HEAVY = {"torch", "transformers", "coremltools", "onnxscript", "onnx", "onnx_ir", "onnxruntime", "safetensors",
         "numpy", "jinja2", "tokenizers", "matplotlib", "onnxruntime_genai"}
MUST_NOT = {
    "facts": HEAVY,
    "runtime": {"torch", "transformers", "coremltools", "onnxscript", "onnx", "onnx_ir", "safetensors"},
    "formats": {"torch", "transformers", "coremltools", "onnxscript", "safetensors"},
    "model": {"onnxruntime", "coremltools", "transformers"},
}
# the CLI imports only this at module level; every command imports its own work
CLI_MODULE_LEVEL = {"graphs.errors", "exporter.cli_types"}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _layer(module: str) -> str:
    for layer, patterns in LAYERS.items():
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return layer
    raise AssertionError(f"{module} has no layer in ARCHITECTURE.md's table")


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level) for every import statement; `from a import b` names a.b when
    that is a project module, else a."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.append((name if name in MODULES else node.module, id(node) in top))
    return found


def _project(name: str) -> str | None:
    """The project module an import refers to (the longest known prefix), or None for a third-party one."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in MODULES:
            return ".".join(parts[:n])
    return None


def test_every_module_has_a_layer_and_keeps_to_it():
    problems = []
    for module, path in sorted(MODULES.items()):
        layer = _layer(module)
        for name, module_level in _imports(path):
            target = _project(name)
            if target is None:
                root = name.split(".")[0]
                if root in MUST_NOT.get(layer, set()):
                    problems.append(f"{module} ({layer}) imports {name}")
                continue
            if layer == "cli" and module_level and target not in CLI_MODULE_LEVEL:
                problems.append(f"{module} imports {target} at module level (commands import their own work)")
            elif _layer(target) not in MAY_IMPORT[layer]:
                problems.append(f"{module} ({layer}) imports {target} ({_layer(target)})")
    assert not problems, "\n".join(problems)


def test_modules_stay_small():
    sizes = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
    assert {m: n for m, n in sizes.items() if n > 450} == {}


def test_state_names_are_spelled_out_in_one_module():
    """`past_conv`, `present_recurrent`, ... appear in graphs/state.py only; everything else derives them."""
    pattern = re.compile(r"(past_conv|past_recurrent|present_conv|present_recurrent|past_key_values)\.|present\.(%d|\d)")
    spelled = sorted(m for m, p in MODULES.items() if pattern.search(p.read_text()))
    assert spelled == ["graphs.state"]


# As if torch were not installed: `import torch` fails and importlib.util.find_spec("torch") is None.
BLOCK_TORCH = """
import sys
for name in ('torch', 'transformers', 'coremltools', 'onnxscript'):
    sys.modules[name] = None
from exporter.cli import main
main(sys.argv[1:])
"""


def _without_torch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("command", [
    ["generate", "{export}", "--prompt", "On Monday the", "--max-new-tokens", "5"],
    ["package", "{export}", "--target", "android", "{tmp}/android"],
    ["package", "{export}", "--target", "web", "{tmp}/web"],
    ["devices", "list"],
    ["devices", "fit", "{export}", "--context", "256"],
])
def test_torch_free_commands_run_without_torch(command, default_export, tmp_path):
    args = [a.format(export=default_export, tmp=tmp_path) for a in command]
    done = _without_torch(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    if command[0] == "package":
        verified = _without_torch("package", "verify", args[-1])
        assert verified.returncode == 0 and verified.stdout.startswith("ok:"), verified.stderr[-2000:]


def test_the_blocker_blocks():
    done = _without_torch("export", "default", "/nonexistent/out")
    assert done.returncode != 0 and "import of torch halted" in done.stderr
