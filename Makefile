# Every target creates .venv and installs the package with its dev extras on first use.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-audio test test-torchmetrics-floor lint bench gpu-check clean

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

# The metric tests against the lowest torchmetrics pyproject.toml allows (the venv has the newest): pl-pmse overrides
# torchmetrics internals, so both ends of the range are run in CI.
TORCHMETRICS_FLOOR := 1.6.0
FLOOR_DIR := $(VENV)/torchmetrics-$(TORCHMETRICS_FLOOR)
test-torchmetrics-floor: $(STAMP)
	test -d $(FLOOR_DIR) || $(PY) -m pip install --quiet --no-deps --target $(FLOOR_DIR) torchmetrics==$(TORCHMETRICS_FLOOR)
	PYTHONPATH=$(FLOOR_DIR) $(PY) -c "import torchmetrics, sys; sys.exit(torchmetrics.__version__ != '$(TORCHMETRICS_FLOOR)')"
	PYTHONPATH=$(FLOOR_DIR) $(PY) -m pytest -q -p no:cacheprovider tests/test_metric.py tests/test_functional.py \
		tests/test_same_number.py tests/test_properties.py tests/test_accelerator_shape.py tests/test_profile.py

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
