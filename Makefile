# Every target creates .venv and installs the package with its dev extras on first use.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-audio test test-torchmetrics-floor test-lightning-floor lint bench gpu-check clean

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
		tests/test_same_number.py tests/test_properties.py tests/test_accelerator_shape.py tests/test_profile.py \
		tests/test_torchmetrics_interop.py tests/test_fidelity.py tests/test_audio_aspects.py

# The Lightning-facing tests against the lowest Lightning pyproject.toml allows (keep the two equal; before 2.5.3
# Lightning refuses the callback's own /dataloader_idx_<i> keys): pytorch-lightning, lightning and lightning-fabric
# (pytorch_lightning imports it). test_callback and test_faults run under pytorch_lightning here and under
# lightning.pytorch inside test_lightning_namespaces.
LIGHTNING_FLOOR := 2.5.3
LIGHTNING_FLOOR_DIR := $(abspath $(VENV))/lightning-$(LIGHTNING_FLOOR)
test-lightning-floor: $(STAMP)
	test -d $(LIGHTNING_FLOOR_DIR) || $(PY) -m pip install --quiet --no-deps --target $(LIGHTNING_FLOOR_DIR) \
		pytorch-lightning==$(LIGHTNING_FLOOR) lightning==$(LIGHTNING_FLOOR) lightning-fabric==$(LIGHTNING_FLOOR)
	PYTHONPATH=$(LIGHTNING_FLOOR_DIR) $(PY) -c "import lightning, lightning_fabric, pytorch_lightning, sys; \
		sys.exit({m.__version__ for m in (lightning, lightning_fabric, pytorch_lightning)} != {'$(LIGHTNING_FLOOR)'})"
	PYTHONPATH=$(LIGHTNING_FLOOR_DIR) $(PY) -m pytest -q -p no:cacheprovider tests/test_callback.py tests/test_faults.py \
		tests/test_lightning_namespaces.py

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
