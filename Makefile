# Two commands matter: `make demo` (the main job) and `make test` (what CI runs).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned here (not in pyproject) because 2.13.0 is the CPU build on this machine's disk;
# a loose `torch` requirement would pull a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
# Triton runs the GPU kernels' tests on CPU through its interpreter; 3.9.0 is the one measured with torch 2.13.0.
TRITON_PIN := triton==3.9.0

.PHONY: install data test demo results clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[test,onnx,lab]' $(TORCH_PIN) $(TRITON_PIN)
	touch $@

install: $(VENV)/.installed

# Fashion-MNIST and Jane Austen's novels from Debian packages (apt-get download, no root, no R).
data:
	bash scripts/fetch_data.sh || echo "make data: could not fetch the Debian data packages; tests that need them will be skipped"

test: install data
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests

demo: install data
	HF_HUB_OFFLINE=1 $(VENV)/bin/ibnorm demo --out runs/demo

# The evidence campaign (docs/results/plan.json): runs or resumes every entry, rewrites every report.
# Hours of CPU; stop it any time and run it again to continue. RESULTS_ARGS="--only NAME" runs one entry.
results: install data
	HF_HUB_OFFLINE=1 $(VENV)/bin/ibnorm results $(RESULTS_ARGS)

clean:
	rm -rf $(VENV) runs build src/*.egg-info
