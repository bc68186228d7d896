# Everything a fresh machine needs: `make test` and `make run` create the venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel; override for a CUDA machine, e.g. make venv TORCH_SPEC='torch==2.14.1'
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: venv serve-venv lint test run bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '$(TORCH_SPEC)'
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# cmdcl-serve and the serving tests: PyTriton pins numpy<2 (the main venv has numpy 2), so its own venv
SERVE_VENV ?= .venv-serve

serve-venv: $(SERVE_VENV)/.installed

$(SERVE_VENV)/.installed: setup.py Makefile
	test -x $(SERVE_VENV)/bin/python || python3 -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install -q --upgrade pip
	$(SERVE_VENV)/bin/python -m pip install -q '$(TORCH_SPEC)'
	$(SERVE_VENV)/bin/python -m pip install -q -e '.[serve]'
	touch $@

# ruff, configured in pyproject.toml; it needs only the main venv.
lint: venv
	$(PY) -m ruff check cmdcl tests benchmarks setup.py

test: venv serve-venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The bundled demo model (exported to ONNX on first use, cached) on the bundled demo videos, ONNX Runtime CPU.
run: venv
	$(VENV)/bin/cmdcl-run $$($(PY) -c 'import cmdcl.assets as a; print(*(a.demo_video(label) for label in a.DEMO_VIDEOS))')

# CPU benchmarks (cmdcl-bench): tiny at batch 1 and 8, base (ViT-B/16, 64 frames) at batch 1 with few
# iterations (each base clip is ~2.3 TFLOP). JSON, plots and Markdown tables go to $(BENCH_DIR).
BENCH_DIR ?= benchmarks/results
bench: venv
	mkdir -p $(BENCH_DIR)
	$(VENV)/bin/cmdcl-bench --device cpu --preset tiny --batch 1,8 --iters 20 --warmup 3 --json $(BENCH_DIR)/cpu-tiny.json --plot $(BENCH_DIR)/cpu-tiny.png --markdown $(BENCH_DIR)/cpu-tiny.md
	$(VENV)/bin/cmdcl-bench --device cpu --preset base --batch 1 --iters 3 --warmup 1 --json $(BENCH_DIR)/cpu-base.json --plot $(BENCH_DIR)/cpu-base.png --markdown $(BENCH_DIR)/cpu-base.md

clean:
	rm -rf $(VENV) $(SERVE_VENV) build *.egg-info .pytest_cache
