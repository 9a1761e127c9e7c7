# medclf: `make demo` runs the main job, `make test` runs the whole suite. Both set up .venv/ first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install system-deps demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@echo "[make] creating $(VENV) with pinned dependencies (log: $(VENV)/install.log)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# The lock is complete (pip check passes on it), so pip need not resolve; and the bytecode is compiled on
	@# all cores afterwards instead of file by file (it must exist: with PYTHONDONTWRITEBYTECODE set, as on
	@# some CI machines, every process would otherwise recompile torch and MONAI from source).
	@$(BIN)/python -m pip install -q --no-deps --no-compile -r requirements.lock >$(VENV)/install.log 2>&1 || (tail -30 $(VENV)/install.log; exit 1)
	@$(BIN)/python -m pip check >>$(VENV)/install.log 2>&1 || (tail -30 $(VENV)/install.log; exit 1)
	@$(BIN)/python -m compileall -q -j 0 -x '/tests/' $(VENV)/lib >>$(VENV)/install.log 2>&1 || true
	@$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e . >>$(VENV)/install.log 2>&1 || (tail -30 $(VENV)/install.log; exit 1)
	@touch $(STAMP)

demo: install
	$(BIN)/medclf demo --out demo-out

# Programs the tests drive that are not Python packages: headless Chromium (browser test of the web page),
# dcmtk (a real DICOM client for the DICOM node) and dicom3tools (dciodvfy validates the SRs it writes). Installed with apt-get when missing and when we can;
# the tests that need them skip with a reason otherwise.
system-deps:
	@missing=""; test -x /usr/bin/chromium || missing="$$missing chromium"; \
	test -x /usr/bin/storescu || missing="$$missing dcmtk"; \
	test -x /usr/bin/dciodvfy || missing="$$missing dicom3tools"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "[make] installing$$missing with apt-get"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) >/tmp/medclf-apt.log 2>&1 \
	      || echo "[make] apt-get failed (see /tmp/medclf-apt.log): tests that need$$missing will skip"; \
	  else echo "[make] not installing$$missing (needs root and apt-get): tests that need it will skip"; fi; \
	fi

test: install system-deps
	@$(BIN)/ruff check src tests benchmarks
	@# The layering contracts of pyproject.toml's [tool.importlinter]: an import against them fails here.
	$(BIN)/lint-imports --no-cache --no-logo
	@# The type checker, configured in pyproject.toml's [tool.mypy]: it must report no issue.
	$(BIN)/mypy
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/lint-imports --no-cache --no-logo
	$(BIN)/mypy

bench: install
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache .ruff_cache
