# Two entry points for a fresh machine: `make run` (the demonstration) and `make test` (what CI runs).
# Both build .venv first; torch is pinned to the CPU wheel before anything that depends on it.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_PIN ?= torch==2.13.0
# `make test` needs the demo (browser test) and the docs site as well as the test tools.
EXTRAS ?= test,demo,docs

.PHONY: run demo test lint docs chromium install

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(VENV)/bin/hf-specssm demo

# The Gradio app on http://127.0.0.1:7860 (see docs/demo.md).
demo: $(VENV)/.installed
	$(VENV)/bin/hf-specssm-demo

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

test: lint docs chromium
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q
