# Two entry points for a fresh machine: `make run` (the demonstration) and `make test` (what CI runs).
# Both build .venv first (`make test` also .venv-5.17); torch is pinned to the CPU wheel before anything
# that depends on it. Each target installs only the extras it runs: `make run` the package and `[bench]`
# (gguf for the model conversion, matplotlib for the plot: ~1.2 GB with torch), `make demo` `[demo]`, the
# test targets everything (Triton alone is ~1 GB, needed only by the kernels' interpreter tests).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_PIN ?= torch==2.13.0
RUN_EXTRAS ?= bench
DEMO_EXTRAS ?= demo
# `make test` needs the demo (browser test) and the docs site as well as the test tools.
EXTRAS ?= test,demo,docs,bench
# The oldest transformers the package supports (pyproject.toml: transformers>=5.17,<5.24) gets a second
# venv, built the same way with transformers pinned; .venv resolves the newest. Only the test extra there:
# the demo tests skip without gradio (importorskip), and lint and the docs build run on .venv only.
OLDEST_TRANSFORMERS ?= 5.17.0
OLDEST_VENV ?= .venv-5.17
OLDEST_PY := $(OLDEST_VENV)/bin/python
OLDEST_EXTRAS ?= test
PYTEST_ARGS ?=

.PHONY: run demo space test test-latest test-oldest test-fast lint docs chromium install install-oldest

# The venv with pip upgraded and torch pinned (kept when it exists).
$(VENV)/.torch:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_PIN)"
	touch $@

# The package (editable) with the extras named after the dash, e.g. .venv/.extras-bench.
$(VENV)/.extras-%: pyproject.toml | $(VENV)/.torch
	$(PIP) install -q -e ".[$*]"
	$(PY) -m hf_specssm.kernels.cpu
	touch $@

$(VENV)/.installed: $(VENV)/.extras-$(EXTRAS)
	touch $@

$(OLDEST_VENV)/.installed: pyproject.toml
	python3 -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/pip install -q --upgrade pip
	$(OLDEST_VENV)/bin/pip install -q "$(TORCH_PIN)"
	$(OLDEST_VENV)/bin/pip install -q -e ".[$(OLDEST_EXTRAS)]" "transformers==$(OLDEST_TRANSFORMERS)"
	$(OLDEST_PY) -m hf_specssm.kernels.cpu
	touch $@

install: $(VENV)/.installed

install-oldest: $(OLDEST_VENV)/.installed

run: $(VENV)/.extras-$(RUN_EXTRAS)
	$(VENV)/bin/hf-specssm demo

# The Gradio app on http://127.0.0.1:7860 (see docs/demo.md).
demo: $(VENV)/.extras-$(DEMO_EXTRAS)
	$(VENV)/bin/hf-specssm-demo

# The Hugging Face Space's files in artifacts/space (its card, app.py, requirements.txt, the packages and
# the shipped drafter); upload with `hf upload --repo-type space USER/NAME artifacts/space`.
space:
	python3 -m hf_specssm_demo.space artifacts/space

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The docs site into site/; --strict turns every warning into a failure. NO_MKDOCS_2_WARNING silences
# mkdocs-material's end-of-life banner, which is not about this site.
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# The browser test drives Debian's `chromium` through Playwright (never `playwright install`, which
# downloads its own browser). Installed here when missing and possible (root with apt-get); otherwise the
# browser test is skipped and says why.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; \
		else \
			echo "chromium is missing and cannot be installed here (needs root and apt-get): the browser test will be skipped"; \
		fi; \
	}

# What CI runs: lint, the docs build, then the whole suite on the newest transformers (.venv) and on the
# oldest supported one (.venv-5.17).
test: lint docs chromium test-latest test-oldest

# The whole suite, slow tests included, on .venv (the newest transformers pyproject.toml allows).
test-latest: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

# The whole suite on .venv-5.17 (transformers 5.17.0); the demo and browser tests skip there (no gradio).
test-oldest: $(OLDEST_VENV)/.installed
	HF_HUB_OFFLINE=1 $(OLDEST_PY) -m pytest -q $(PYTEST_ARGS)

# Under 3 minutes on 2 cores: every test but those marked `slow` (over ~5 s, or the tail of a parity grid).
test-fast: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)
