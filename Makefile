# Two commands a newcomer needs: `make train` and `make test`. Each sets up .venv first when needed;
# `make test-fast` runs the tests that start no process (under 3 minutes on 2 cores) while you work.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup train test test-fast clean

setup: $(STAMP)

# torch is pinned first: that release is the CPU build this machine keeps on disk; an unpinned
# torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

train: $(STAMP)
	$(PY) train/pretrain.py $(ARGS)

# .ci/test.sh starts the one-node Slurm cluster when it can (root), else the Slurm tests skip and
# the last line says why.
test: $(STAMP)
	PY=$(PY) bash .ci/test.sh $(ARGS)

# Every test that starts a process (a launcher, a script, a worker pool, a compiler) is marked `slow`.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
