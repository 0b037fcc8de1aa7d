# streamvln-pipeline. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
DASHSCOPE := dashscope==2.0.2
TOKENIZER := build/qwen2_tokenizer
DEMO := data/demo
SRCS := --src $(DEMO)/R2R --src $(DEMO)/RxR
VAL_SRCS := --src $(DEMO)/val/R2R --src $(DEMO)/val/RxR

.PHONY: help install tokenizer demo-data shards demo test bench clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(VENV)/.installed  ## .venv with the package (editable) and test tools; idempotent

$(VENV)/.installed: setup.cfg
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# Qwen2's BPE ranks ship inside the dashscope wheel; only that one file is taken from it.
build/qwen.tiktoken: | $(VENV)/.installed
	mkdir -p build/wheels
	$(PY) -m pip download -q --no-deps $(DASHSCOPE) -d build/wheels
	$(PY) -c "import glob, zipfile; zipfile.ZipFile(sorted(glob.glob('build/wheels/dashscope-*.whl'))[-1]).extract('dashscope/resources/qwen.tiktoken', 'build/wheels')"
	mv build/wheels/dashscope/resources/qwen.tiktoken $@

$(TOKENIZER)/tokenizer.json: build/qwen.tiktoken
	$(BIN)/streamvln-shards tokenizer --tiktoken $< --out $(TOKENIZER)

tokenizer: $(TOKENIZER)/tokenizer.json  ## build the Qwen2 tokenizer locally into build/qwen2_tokenizer

$(DEMO)/RxR/annotations.json: | $(VENV)/.installed
	$(BIN)/streamvln-shards synth --out $(DEMO)

demo-data: $(DEMO)/RxR/annotations.json  ## write the synthetic demo trajectories into data/demo

shards: tokenizer demo-data  ## write shards/nav (train and val splits) from the demo data
	$(BIN)/streamvln-shards nav $(SRCS) --tokenizer $(TOKENIZER) --out shards --config configs/shards/demo.yaml --quiet
	$(BIN)/streamvln-shards nav $(VAL_SRCS) --tokenizer $(TOKENIZER) --out shards --config configs/shards/demo.yaml --split val --quiet

demo: shards  ## fresh machine to a trained model: install, tokenizer, data, shards, peek, train, evaluate
	tools/peek shards/nav
	tools/peek shards/nav --verify
	tools/peek shards/nav --tokenizer $(TOKENIZER) --no-color \
		--sample $$($(PY) -c "import pyarrow.parquet as pq; t = pq.read_table('shards/nav/index.parquet').to_pylist(); print(next(r['key'] for r in t if r['n_history']))") \
		--sheet shards/peek-example.png
	rm -rf runs/demo
	$(BIN)/streamvln-train --shards configs/data/demo.yaml --config configs/train/demo.yaml --output-dir runs/demo
	$(BIN)/streamvln-eval --checkpoint runs/demo/final --shards configs/data/demo_val.yaml --out runs/demo/eval.json

test: install tokenizer  ## run the test suite (installs what it needs)
	STREAMVLN_TOKENIZER=$(TOKENIZER) $(PY) -m pytest -q

bench: install tokenizer shards  ## benchmarks: print throughput and memory numbers (not tests)
	STREAMVLN_TOKENIZER=$(TOKENIZER) $(PY) tests/bench/bench_shards.py
	STREAMVLN_TOKENIZER=$(TOKENIZER) $(PY) tests/bench/bench_loader.py
	$(PY) tests/bench/bench_train.py

clean:  ## remove generated data, shards and the demo run (keeps .venv and build/)
	rm -rf $(DEMO) shards/nav shards/peek-example.png runs/demo
