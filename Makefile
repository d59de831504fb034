# Two commands matter: `make demo` (the main job) and `make test` (what CI runs).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned here (not in pyproject) because 2.13.0 is the CPU build on this machine's disk;
# a loose `torch` requirement would pull a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0

.PHONY: install test demo clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[test,onnx,experiments]' $(TORCH_PIN)
	touch $@

install: $(VENV)/.installed

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests

demo: install
	HF_HUB_OFFLINE=1 $(PY) examples/gpt2_pydoc_demo.py --out runs/demo

clean:
	rm -rf $(VENV) runs build src/*.egg-info
