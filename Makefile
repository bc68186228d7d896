# Everything a fresh machine needs: `make test` and `make run` create the venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel; override for a CUDA machine, e.g. make venv TORCH_SPEC='torch==2.14.1'
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: venv test run clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '$(TORCH_SPEC)'
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

run: venv
	$(VENV)/bin/cmdcl-demo

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
