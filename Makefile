# Two commands a new user needs: `make demo` and `make test` (see README.md).
# Install is idempotent: the stamp file makes a second run skip pip entirely.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; on a CUDA machine set TORCH_SPEC to the build you want.
TORCH_SPEC ?= torch==2.13.0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install demo test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	# torch first, so that no dependency pulls a multi-GB CUDA build onto a CPU machine
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(VENV)/bin/pocl-ray demo $(ARGS)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check pocl_ray jobs tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache
