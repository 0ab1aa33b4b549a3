# make quickstart   install, write the digits data set, then train a small CLIP on it on CPU and score it zero-shot
#                   (then the evaluation suite yamls/eval/digits.yaml: classification and retrieval, one table)
# make test         install, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first so that pip takes this machine's wheels; override for another CUDA build.
TORCH ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: install test quickstart lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The digits data set, then training: one thread for the tiny model, the other core for the data worker
# (on 2 cores, more threads only contend).
quickstart: install
	$(BIN)/python -m cadenza.datasets.digits --out data/digits
	OMP_NUM_THREADS=1 $(BIN)/composer yamls/quickstart.yaml
	OMP_NUM_THREADS=1 $(BIN)/composer eval --tasks yamls/eval/digits.yaml logs/quickstart/checkpoints/epoch_latest.pt

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) logs build *.egg-info
