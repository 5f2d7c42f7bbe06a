# One command to serve, one to test. Both build .venv first.
# CPU machines get torch==2.13.0 (CPU build); on a GPU machine set TORCH_SPEC to your CUDA build.
VENV       ?= .venv
PYTHON     ?= python3
TORCH_SPEC ?= torch==2.13.0
MODEL      ?= builtin/shapes
PORT       ?= 8091
TP         ?= 1
BIN        := $(VENV)/bin

.PHONY: install serve test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@echo "==> [1/3] virtual environment in $(VENV)"
	$(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install --quiet --upgrade pip
	@echo "==> [2/3] $(TORCH_SPEC)"
	$(BIN)/python -m pip install "$(TORCH_SPEC)"
	@echo "==> [3/3] ditserve and its dependencies (2-3 minutes on a fresh machine)"
	$(BIN)/python -m pip install -e ".[test]"
	@$(BIN)/serve --help 2>/dev/null | grep -q -- --tensor-parallel-size || { \
	  $(BIN)/python -m pip install --quiet --no-deps --force-reinstall -e . && \
	  echo "make: restored ditserve's serve command (Ray installs a script of the same name; 'ditserve serve' always works)"; }
	touch $@
	@echo "==> installed. Next: 'make serve' (then open http://127.0.0.1:$(PORT)) or 'make test'"

serve: install
	$(BIN)/serve $(MODEL) --omni --port $(PORT) --tensor-parallel-size $(TP)

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15 tests

clean:
	rm -rf $(VENV) *.egg-info
