"""The web bundle of a multimodal export: transformers.js loads it as an image-text-to-text model
(Node, and a real headless Chromium page on the WebAssembly backend), and its tokens equal
`qwen-edge generate`'s for a text prompt and an image prompt."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import onnx
import pytest

from tests.conftest import JS_DIR
from exporter.package.build import package_export
from runtime_py.generate import generate, stop_ids
from runtime_py.session import OnnxModel
from runtime_py.tokenizer import TextTokenizer
from runtime_py.vision import VisualRequest, visual_parts, visual_prompt, with_visuals

PROMPT = "What is in it?"
NEW_TOKENS = 16
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def vl_web_bundle(tiny_vl_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vl_web") / "vlbundle"
    package_export(tiny_vl_export, out, "web", ["fp32", "q8"])
    return out


def runtime_image_tokens(export: Path, variant: str, image: Path) -> tuple[list[int], list[int]]:
    """Prompt ids and greedy tokens of `qwen-edge generate --chat --image IMAGE` (runtime_py)."""
    model, tokenizer = OnnxModel(export, variant), TextTokenizer(export)
    messages = with_visuals([{"role": "user", "content": PROMPT}], VisualRequest((image,)))
    prompt = visual_prompt(export, variant, tokenizer.apply_chat_template(messages), visual_parts(messages), tokenizer,
                           model, NEW_TOKENS)
    return prompt.ids, generate(model, prompt.ids, NEW_TOKENS, stop_ids=stop_ids(export), visual=prompt)


def runtime_text_tokens(export: Path, variant: str) -> tuple[list[int], list[int]]:
    tokenizer = TextTokenizer(export)
    ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}]))
    return ids, generate(OnnxModel(export, variant), ids, NEW_TOKENS, stop_ids=stop_ids(export))


def without_stop(tokens: list[int], stops: list[int]) -> list[int]:
    """transformers.js keeps the end-of-sequence token it stopped on; runtime_py does not."""
    return tokens[:-1] if tokens and tokens[-1] in stops else tokens


def test_layout_carries_the_vision_encoder(vl_web_bundle: Path) -> None:
    config = json.loads((vl_web_bundle / "config.json").read_text())
    assert config["vision_config"]["depth"] == 2 and config["image_token_id"] > 0
    graphs = sorted(p.name for p in (vl_web_bundle / "onnx").glob("*.onnx"))
    assert "vision_encoder.onnx" in graphs and "vision_encoder_quantized.onnx" in graphs
    assert config["transformers.js_config"]["use_external_data_format"] == {name: 1 for name in graphs}
    vision = onnx.load(str(vl_web_bundle / "onnx" / "vision_encoder.onnx"), load_external_data=False)
    assert [i.name for i in vision.graph.input] == ["pixel_values", "image_grid_thw"]
    assert [o.name for o in vision.graph.output] == ["image_features"]
    processor = json.loads((vl_web_bundle / "preprocessor_config.json").read_text())
    assert processor["merge_size"] == 2
    # transformers.js applies only the steps the file states (a missing do_normalize: none)
    assert processor["do_rescale"] and processor["do_normalize"] and processor["resample"] == 3
    assert (vl_web_bundle / "qwen_edge_rope.mjs").is_file()
    manifest = json.loads((vl_web_bundle / "manifest.json").read_text())
    assert manifest["variants"]["fp32"]["vision_encoder"] == "onnx/vision_encoder.onnx"
    assert "qwen_edge_rope.mjs" in {f["path"] for f in manifest["files"]}


@pytest.mark.parametrize("variant", ["fp32", "q8"])
def test_transformers_js_image_prompt_matches_runtime(node: str, vl_web_bundle: Path, tiny_vl_export: Path,
                                                      test_images: dict[str, Path], variant: str) -> None:
    """One image per prompt (transformers.js 4.3's limit), a size its resize leaves alone (64×64)."""
    done = subprocess.run([node, "image_greedy.mjs", "--model", str(vl_web_bundle), "--image",
                           str(test_images["square"]), "--prompt", PROMPT, "--dtype", variant,
                           "--max-new-tokens", str(NEW_TOKENS)], cwd=JS_DIR, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    js = json.loads(done.stdout.strip().splitlines()[-1])
    ids, expected = runtime_image_tokens(tiny_vl_export, variant, test_images["square"])
    assert js["prompt_ids"] == ids
    assert without_stop(js["generated_ids"], stop_ids(tiny_vl_export)) == expected


def test_transformers_js_text_prompt_with_shipped_rope_fix(node: str, vl_web_bundle: Path,
                                                           tiny_vl_export: Path) -> None:
    """generate.mjs imports fixTextRopeDelta from the bundle's qwen_edge_rope.mjs, as an app does."""
    done = subprocess.run([node, "generate.mjs", "--model", str(vl_web_bundle), "--dtype", "fp32", "--chat",
                           "--prompt", PROMPT, "--max-new-tokens", str(NEW_TOKENS)],
                          cwd=JS_DIR, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    js = json.loads(done.stdout.strip().splitlines()[-1])
    ids, expected = runtime_text_tokens(tiny_vl_export, "fp32")
    assert js["text_rope_delta_fixed"] is True
    assert js["prompt_ids"] == ids and without_stop(js["generated_ids"], stop_ids(tiny_vl_export)) == expected


class _Server(ThreadingHTTPServer):
    """Serves URL prefixes from folders and takes the page's result as POST /result."""

    def __init__(self, roots: dict[str, Path]) -> None:
        self.roots, self.result, self.done = roots, None, threading.Event()
        super().__init__(("127.0.0.1", 0), partial(_Handler, server_roots=roots))


class _Handler(SimpleHTTPRequestHandler):
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript", ".js": "text/javascript",
                      ".wasm": "application/wasm", ".json": "application/json"}

    def __init__(self, *args, server_roots: dict[str, Path], **kwargs) -> None:  # noqa: ANN002, ANN003
        self.server_roots = server_roots
        super().__init__(*args, **kwargs)

    def translate_path(self, path: str) -> str:
        path = path.split("?", 1)[0]
        for prefix, root in self.server_roots.items():
            if path.startswith(prefix):
                return str(root / path[len(prefix):])
        return str(Path("/nonexistent"))

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.result = json.loads(body)
        self.send_response(204)
        self.end_headers()
        self.server.done.set()

    def log_message(self, *args) -> None:  # noqa: ANN002
        pass


def test_chromium_page_runs_the_bundle_on_webassembly(vl_web_bundle: Path, tiny_vl_export: Path,
                                                      test_images: dict[str, Path]) -> None:
    """A page on localhost, Debian's headless Chromium, transformers.js's browser build (onnxruntime-web
    WebAssembly, one thread): a text prompt and an image prompt give `qwen-edge generate`'s tokens."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (make install runs 'apt-get install -y chromium' where apt-get works)")
    dist = JS_DIR / "node_modules" / "@huggingface" / "transformers" / "dist"
    ort_dist = JS_DIR / "node_modules" / "onnxruntime-web" / "dist"
    roots = {"/page/": JS_DIR / "browser", "/tjs/": dist, "/ort/": ort_dist, "/models/": vl_web_bundle.parent,
             "/images/": test_images["square"].parent}
    server = _Server(roots)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = (f"http://127.0.0.1:{server.server_address[1]}/page/index.html?bundle={vl_web_bundle.name}"
           f"&image=/images/{test_images['square'].name}&prompt={quote(PROMPT)}&max={NEW_TOKENS}")
    with tempfile.TemporaryDirectory(prefix="qwen-edge-chromium-") as profile:
        browser = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", url],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            finished = server.done.wait(timeout=300)
        finally:
            browser.kill()
            browser.wait()
            server.shutdown()
    assert finished, "the page did not report within 300 s"
    result = server.result
    assert result["ok"], result.get("error")
    assert "HeadlessChrome" in result["user_agent"] and result["text_rope_delta_fixed"] is True
    stops = stop_ids(tiny_vl_export)
    ids, expected = runtime_text_tokens(tiny_vl_export, "fp32")
    assert result["text"]["prompt_ids"] == ids and without_stop(result["text"]["generated_ids"], stops) == expected
    ids, expected = runtime_image_tokens(tiny_vl_export, "fp32", test_images["square"])
    assert result["image"]["prompt_ids"] == ids and without_stop(result["image"]["generated_ids"], stops) == expected
