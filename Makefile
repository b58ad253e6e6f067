# forge: the two commands a newcomer needs are `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-quick lint format clean

# torch first, pinned: 2.13.0 is the CPU wheel on local disk, so nothing pulls the CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	@# DeepSpeed's CPU communication op, built once here instead of in the first training job
	$(PY) -c "from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder as B; B().load(verbose=False)" 2>&1 | grep -v WARNING || true
	touch $@

install: $(VENV)/.installed

demo: install
	bash configs/examples/demo.sh

test: install
	$(PY) -m pytest -q

test-quick: install
	$(PY) -m pytest -q -m "not integration"

lint: install
	$(VENV)/bin/ruff check orchestrator serve tests benchmarks configs

format: install
	$(VENV)/bin/ruff format orchestrator serve tests benchmarks configs

clean:
	rm -rf forge-runs wandb .pytest_cache
