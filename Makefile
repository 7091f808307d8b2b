# `make train` and `make test` do all the set-up on a fresh machine: a virtual environment in
# .venv with torch 2.13.0 (the CPU build) installed first and pinned, then this package.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: train test bench

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

train: $(VENV)/.installed
	$(VENV)/bin/ddpo train

test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) bench/throughput.py
