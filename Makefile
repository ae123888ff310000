# `make demo` and `make test` work on a fresh machine: they create .venv and install on first use.
PY ?= python3.11
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow install bench clean

$(STAMP): pyproject.toml
	@test -x $(VPY) || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch first, pinned as in pyproject.toml: pip installs the torch==2.13.0 build its index serves,
	# the CPU one only where the index provides it (PIP_INDEX_URL / PIP_EXTRA_INDEX_URL; see README).
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
