# mmconvert: `make demo` runs the main job on the built-in example; `make test` runs every test.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
DEMO := out/demo

.PHONY: install install-llama demo test test-fast lint bench clean

install:
	$(PIP) install -q torch==2.13.0            # the CPU wheel; an unpinned torch pulls CUDA
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
	$(PYTHON) scripts/pytest_or_fail.py tests

test-fast: install
	$(PYTHON) scripts/pytest_or_fail.py tests -m "not llama and not slow"

lint:
	$(PYTHON) -m ruff check .

bench: install-llama
	$(PYTHON) bench/bench_to_gguf.py

clean:
	rm -rf out build *.egg-info .pytest_cache bench/_work
