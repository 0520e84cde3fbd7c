# Every target creates .venv and installs the package with its dev extras on first use.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-audio test lint bench gpu-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/image_denoising.py fit --config configs/image_denoising.yaml

demo-audio: $(STAMP)
	$(PY) examples/audio_enhancement.py fit --config configs/audio_enhancement.yaml

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) benchmarks/run.py

# On a machine with a CUDA GPU (a few minutes): the CUDA tests, then the quick CUDA benchmarks; record the output in
# BENCHMARKS.md. PL_PMSE_GPU_CHECK=cpu runs the tests' checks on the CPU (the accelerator path forced).
gpu-check: $(STAMP)
	$(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() or '$(PL_PMSE_GPU_CHECK)' == 'cpu' else 'gpu-check: no CUDA device')"
	$(PY) -m pytest -q -p no:cacheprovider tests/test_cuda.py
	$(PY) benchmarks/run.py --device $(if $(filter cpu,$(PL_PMSE_GPU_CHECK)),cpu,cuda) --quick --only small-batch \
		--only pixel --only pyramid --only features --only launches

clean:
	rm -rf $(VENV) wandb lightning_logs runs .pytest_cache
