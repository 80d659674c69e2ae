# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv if missing, install the CPU build of torch first (a plain `pip install torch`
# would fetch a multi-GB CUDA build), then the project, then the assets (model + corpus).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.modelfold-installed
DEMO_OUT ?= out/demo
DEMO_PIPELINE ?= layer-importance,drop-layers{count=2}

.PHONY: setup assets demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(STAMP)

assets: setup
	$(BIN)/modelfold assets pull

demo: assets
	$(BIN)/modelfold inspect smollm2-135m --graph out/smollm2-dataflow.html
	$(BIN)/modelfold convert smollm2-135m -p '$(DEMO_PIPELINE)' -o $(DEMO_OUT) --overwrite
	$(BIN)/modelfold eval smollm2-135m --chars 50000
	$(BIN)/modelfold eval $(DEMO_OUT) --chars 50000
	$(BIN)/modelfold generate $(DEMO_OUT) "The history of the Roman Empire" --max-new-tokens 32

test: assets
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=25

lint: setup
	$(BIN)/ruff check modelfold ir passes backends kernels tests tools

clean:
	rm -rf out build *.egg-info
