# Two commands on a fresh machine: `make demo` and `make test`.
# torch is installed first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
TORCH := torch==2.13.0
export MTLREC_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: venv demo test lint bench-census bench-balance bench-cascade bench-speed bench-speed-gpu bench-zoo bench-sequence bench-fairness bench-fusion-rl bench-scale bench-serve bench-reproduce clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mtlrec train --dataset synthetic-mmoe --model shared-bottom --out runs/demo/shared-bottom --quiet
	$(BIN)/mtlrec train --dataset synthetic-mmoe --model mmoe --out runs/demo/mmoe --quiet
	$(BIN)/mtlrec compare runs/demo/shared-bottom runs/demo/mmoe

test: $(STAMP)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench-census: $(STAMP)
	$(BIN)/python benchmarks/census/run.py
	$(BIN)/python benchmarks/census/peers.py
	$(BIN)/python benchmarks/census/halves.py
	$(BIN)/python benchmarks/census/run.py --report-only

clean:
	rm -rf runs .pytest_cache

bench-balance: $(STAMP)
	$(BIN)/python benchmarks/balance/run.py --parallel 2

bench-cascade: $(STAMP)
	$(BIN)/python benchmarks/cascade/run.py

bench-speed: $(STAMP)
	$(BIN)/python benchmarks/speed/run.py --models mmoe,shared-bottom,esmm,ple
	$(BIN)/python benchmarks/speed/quality.py

bench-speed-gpu: $(STAMP)
	$(BIN)/python benchmarks/speed/run.py --device cuda --models mmoe,shared-bottom,esmm,ple --repeats 3

bench-reproduce: $(STAMP)
	$(BIN)/python benchmarks/reproduce/run.py

bench-zoo: $(STAMP)
	$(BIN)/python benchmarks/zoo/run.py --parallel 2

bench-sequence: $(STAMP)
	$(BIN)/python benchmarks/sequence/run.py --parallel 2

bench-fairness: $(STAMP)
	$(BIN)/python benchmarks/fairness/run.py

bench-fusion-rl: $(STAMP)
	$(BIN)/python benchmarks/fusion_rl/run.py

bench-scale: $(STAMP)
	$(BIN)/python benchmarks/scale/run.py

bench-serve: $(STAMP)
	$(BIN)/python benchmarks/serve/load_test.py
