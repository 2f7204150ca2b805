# The two commands of the README:  `make demo`  and  `make test`.
# Both create .venv on first use (torch CPU wheel first, then the project with its extras).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
DEMO   ?= .clinfuse-demo

.PHONY: setup demo test test-fast test-slow lint wheel clean

$(BIN)/clinfuse: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: a bare requirement would pull a multi-GB CUDA build on CPU machines.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,jpeg]"
	touch $(BIN)/clinfuse

setup: $(BIN)/clinfuse

demo: setup
	$(BIN)/clinfuse demo --workdir $(DEMO)

test: setup
	$(BIN)/python -m pytest -q -m "not slow"
	$(BIN)/python -m pytest -q -m slow

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check clinfuse federated tests benchmarks

# The wheel of the README's installed route: dist/clinfuse-<version>-py3-none-any.whl.
# build/ goes first: setuptools reuses it and would ship modules since deleted from the source.
wheel: setup
	rm -rf build dist/clinfuse-*.whl
	$(BIN)/pip wheel --quiet --no-deps -w dist .

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache build dist
