# initserve: torch.nn.init as a gRPC service. `make serve` runs it, `make test` proves it.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 50051
PROTO := proto/initserve/v1/initserve.proto
STUBS := client/initserve/v1/initserve_pb2.py client/initserve/v1/initserve_pb2_grpc.py client/initserve/v1/initserve_pb2.pyi
INSTALLED := $(VENV)/.installed

.PHONY: install proto serve demo test test-all soak bench lint clean

install: $(INSTALLED) $(STUBS)

# torch goes in first and alone, pinned, so no later resolution can pull the multi-GB CUDA build.
$(INSTALLED): constraints.txt requirements-dev.txt client/pyproject.toml server/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt torch
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -r requirements-dev.txt -e client -e server
	touch $@

proto: $(STUBS)

$(STUBS) &: $(PROTO) $(INSTALLED)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=client --pyi_out=client --grpc_python_out=client $(PROTO)

serve: install
	$(VENV)/bin/initserve-server --host $(HOST) --port $(PORT)

demo: install
	$(PY) examples/demo.py

test: install
	$(PY) -m pytest -m "not slow" -q

test-all: install
	$(PY) -m pytest -q

# The long fault-and-load run; writes its figures to docs/reliability.md.
soak: install
	$(PY) -m tests.soak --duration 300 --report docs/reliability.md

# Throughput, latency, concurrency and memory against ceilings measured in the same run (about 10-15 min);
# writes docs/bench/bench.json and docs/bench/bench.png. A wrong byte fails it; a missed target does not.
bench: install
	$(PY) bench/run.py --json docs/bench/bench.json --plot docs/bench/bench.png

lint: install
	$(VENV)/bin/ruff check client server tests examples bench
	$(VENV)/bin/ruff format --check client server tests examples bench

clean:
	rm -rf $(VENV) $(STUBS) .pytest_cache .ruff_cache
