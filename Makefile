# The two commands of the README: `make demo` and `make test`. Both create .venv if it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The demo trains on the embedded default dataset (elpv) with the offline EfficientNet-Lite0 weights,
# with imgtune's defaults (on a CPU: the head on cached features; pass DEMO_ARGS="--epochs 2" to also
# fine-tune the whole network).
DEMO_ARGS ?=

.PHONY: demo test test-fast install install-dev

$(PY):
	$(PYTHON) -m venv $(VENV)

# Stamp files so a second `make` does not reinstall; they are remade when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PY) -m pip install -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(VENV)/bin/imgtune train $(DEMO_ARGS)

# The layering contracts (pyproject.toml's [tool.importlinter]), then every test, the few slow ones on
# real weights and data included.
test: $(VENV)/.installed-dev
	$(VENV)/bin/lint-imports
	$(PY) -m pytest

# The quick tests only (tiny synthetic images, randomly initialised models).
test-fast: $(VENV)/.installed-dev
	$(PY) -m pytest -m "not slow"
