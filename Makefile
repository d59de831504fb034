# Two commands matter: `make demo` (the main job) and `make test` (what CI runs).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch and torchvision are pinned here (not in pyproject) to a matching pair in this machine's package cache
# (timm needs torchvision, and no torchvision loads beside the CPU torch 2.13.0); a loose `torch` would
# resolve to another multi-GB build.
TORCH_PIN := torch==2.14.1
TORCHVISION_PIN := torchvision==0.29.1
# Triton runs the GPU kernels' tests on CPU through its interpreter; torch 2.14.1 requires triton~=3.8.0.
TRITON_PIN := triton==3.8.0

.PHONY: install data test demo results clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PIN) $(TORCHVISION_PIN) $(TRITON_PIN)
	$(PY) -m pip install --quiet -e '.[test,onnx,lab]' $(TORCH_PIN) $(TORCHVISION_PIN) $(TRITON_PIN)
	touch $@

install: $(VENV)/.installed

# Fashion-MNIST and Jane Austen's novels from Debian packages (apt-get download, no root, no R).
# A failed fetch stops `make test` and `make demo` with the script's reason: CI must not go green
# with the data tests skipped.
data:
	bash scripts/fetch_data.sh

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
