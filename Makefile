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

# Plan and apply random patterns on every torchvision model (about half an hour on two cores), then on one model per
# timm family (scripts/zoo_timm.py); writes out/zoo.json, out/zoo_timm.json and the tables in docs/coverage.md.
# `$(PYTHON) scripts/zoo.py --models NAME ...` and `$(PYTHON) scripts/zoo_timm.py --family NAME ...` rerun some.
.PHONY: zoo
zoo: install
	$(PYTHON) scripts/zoo.py
	$(PYTHON) scripts/zoo_timm.py

# Time planning, applying and the pruned models' latency against apple-upscale (the reference implementation of the
# UPSCALE paper) and Torch-Pruning (25-45 minutes on two cores); writes out/bench.json and the CPU tables of
# docs/performance.md. `$(PYTHON) benchmarks/bench.py --quick` is a short subset; `--help` lists the `--models` and
# `--skip-*` options, which `make bench BENCH_ARGS="--quick"` passes on. --no-deps: apple-upscale 0.1.1 pins
# torch==2.0.1, which would replace the pinned torch; the peers need only torch, torchvision and numpy at run time.
.PHONY: bench
bench: install
	$(PIP) install -q --no-deps apple-upscale==0.1.1 torch-pruning==1.6.1
	$(PIP) install -q numpy
	$(PYTHON) benchmarks/bench.py $(BENCH_ARGS)

# Train a small CNN on scikit-learn's bundled digits, prune it without fine-tuning at 10-50% with every criterion in
# constrained and unconstrained mode (about 1.5 minutes on two cores); writes out/digits.json and the accuracy table
# in docs/accuracy.md. `$(PYTHON) examples/digits.py --quick` is a short smoke test.
.PHONY: digits
digits: install
	$(PIP) install -q -e '.[examples]'
	$(PYTHON) examples/digits.py --out $(OUT)/digits.json --docs
