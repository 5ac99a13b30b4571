# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test reproduce-digits bench clean-venv

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

demo: $(VENV)/.installed  ## sample the shipped digits checkpoints and print their evaluation table
	$(PY) demo.py

test: $(VENV)/.installed  ## the test suite (about 10 minutes on 2 CPU cores)
	$(PY) -m pytest -q tests

reproduce-digits: $(VENV)/.installed  ## rerun the whole digits chain from scratch (about 45 minutes on 2 CPU cores)
	bash bench/reproduce_digits.sh

bench: $(VENV)/.installed  ## CPU benchmarks into bench/RESULTS.md
	$(PY) bench/bench.py --config digits_u

clean-venv:
	rm -rf $(VENV)
