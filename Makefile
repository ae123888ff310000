# `make demo` and `make test` work on a fresh machine: they create .venv and install on first use.
PY ?= python3.11
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow install bench clean

$(STAMP): pyproject.toml
	@test -x $(VPY) || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch first, pinned: pip takes the CPU build from local disk (a bare `torch` would pull CUDA).
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VPY) -m sfpo_megatron.demo

test: $(STAMP)
	$(VPY) -m pytest -q

test-slow: $(STAMP)
	$(VPY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) demo_out
