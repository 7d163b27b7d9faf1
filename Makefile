# Set-up is part of every target: a clean clone needs nothing but python3 (3.10+).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The transformers.js harness of the web-bundle test (exact versions from tests/js/package-lock.json).
JS_DEPS := tests/js/node_modules/.package-lock.json
DEMO_OUT := build/demo

.PHONY: install test demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, exactly pinned: this version is the local CPU build; anything else pulls CUDA.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

$(JS_DEPS): tests/js/package.json tests/js/package-lock.json
	@if command -v npm >/dev/null; then \
		cd tests/js && npm ci --ignore-scripts --no-audit --no-fund; \
	else \
		echo "npm not found: tests/js (transformers.js) is not installed, so tests/test_package_web.py fails where node exists"; \
	fi

# Debian's Chromium for the browser page test (tests/test_vision_web.py); skipped with its reason where
# apt-get is missing or fails (not root, no Debian registry).
BROWSER := /usr/bin/chromium

$(BROWSER):
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "apt-get install chromium failed: the browser page test will be skipped"; \
	else \
		echo "no root apt-get: chromium not installed, the browser page test will be skipped"; \
	fi

install: $(STAMP) $(JS_DEPS) $(BROWSER)

# Two workers (pytest-xdist) on the two cores; the exports many tests share are built once (tests/conftest.py).
# The 25 slowest setups and calls are listed at the end: CI has 20 minutes.
test: $(STAMP) $(JS_DEPS) $(BROWSER)
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=25 tests

demo: $(STAMP)
	$(VENV)/bin/qwen-edge export default $(DEMO_OUT) --quant fp32,q4f16 --force
	$(VENV)/bin/qwen-edge verify default $(DEMO_OUT)
	$(VENV)/bin/qwen-edge verify $(DEMO_OUT) --against default
	$(VENV)/bin/qwen-edge generate $(DEMO_OUT) --prompt "On Monday the" --max-new-tokens 40
	$(VENV)/bin/qwen-edge generate $(DEMO_OUT) --variant q4f16 --chat --prompt "What is 12 plus 7?" --max-new-tokens 30

bench: $(STAMP)
	$(PY) -m exporter.bench.export --quality-default
	$(PY) -m exporter.bench.export --preset qwen3.5-0.8b --quant fp32,fp16,q8,q4,q4f16
	$(PY) -m exporter.bench.export --preset qwen3.5-0.8b --quant q4 --block-size 64
	$(PY) -m exporter.bench.export --preset qwen3.5-2b --quant fp32,fp16,q8,q4,q4f16
	$(PY) -m exporter.bench.export --preset qwen3.5-0.8b --speed q4 --quant q4,q4f16
	$(PY) -m exporter.bench.export --preset qwen3.5-0.8b --speed q4 --quant q4 --block-size 128 --no-compare
	$(PY) -m exporter.bench.export --preset qwen3.5-2b --speed q4 --quant q4 --no-compare
	$(PY) -m exporter.bench.coreml --preset qwen3.5-0.8b --quant fp32,fp16,q8,q4,q4f16,p4,q4mix
	$(PY) -m exporter.bench.variants --preset qwen3.5-0.8b --threads 2
	$(PY) -m exporter.bench.export --preset qwen3.5-0.8b --quant q4,q4f16,fp16 --verify-all
	$(PY) -m exporter.bench.export --preset qwen3.5-2b --quant q4,q4f16,fp16 --verify-all
	$(PY) -m exporter.bench.export --preset qwen3.5-4b --quant q4,q4f16,fp16 --verify-all
	$(PY) -m exporter.bench.export --preset qwen3.5-9b --quant q4,q4f16,fp16 --verify-all
	$(PY) -m exporter.bench.vision --preset qwen3.5-0.8b
	$(PY) -m exporter.bench.vision --preset qwen3.5-2b
	# acceptance of the default model's trained MTP head on held-out text (BENCHMARKS.md, issue 14)
	$(VENV)/bin/qwen-edge export default build/bench/default-q4 --quant q4 --force
	$(PY) -m exporter.bench.speculative build/bench/default-q4 --variant q4 --prompt 64 --tokens 64 \
		--draft-tokens 1,2,3 --acceptance 0,1 --repeats 1 --heldout default_model/heldout.txt --skip-restore \
		--out bench_out/speculative_default.json

clean:
	rm -rf build $(VENV) tests/js/node_modules
