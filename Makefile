# initserve: torch.nn.init as a gRPC service. `make serve` runs it, `make test` proves it.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 50051
PROTO := proto/initserve/v1/initserve.proto
STUBS := $(addprefix proto/initserve_protocol/v1/,initserve_pb2.py initserve_pb2_grpc.py initserve_pb2.pyi)
INSTALLED := $(VENV)/.installed

.PHONY: install proto serve demo test test-all soak bench lint docker container-test clean

install: $(INSTALLED) $(STUBS)

# torch goes in first and alone, pinned, so no later resolution can pull the multi-GB CUDA build.
$(INSTALLED): constraints.txt requirements-dev.txt proto/pyproject.toml memory/pyproject.toml client/pyproject.toml \
		server/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt torch
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -r requirements-dev.txt -e proto -e memory -e client -e server
	touch $@

proto: $(STUBS)

$(STUBS) &: $(PROTO) proto/generate.py $(INSTALLED)
	$(PY) proto/generate.py

serve: install
	$(VENV)/bin/initserve-server --host $(HOST) --port $(PORT)

demo: install
	$(PY) examples/demo.py

test: install
	$(PY) -m pytest -m "not slow" -q

test-all: install
	$(PY) -m pytest -q

# The long run: the fuzz with fresh examples, ten times as many as `make test` replays; then (about 10 min)
# hostile clients (stalled readers, the heaviest admitted requests), peak memory under every scheme at its largest,
# and the fault soak with a same-host attacker, which writes docs/reliability.md.
soak: install
	INITSERVE_FUZZ=soak $(PY) -m pytest -q tests/e2e/test_fuzz.py --timeout 1800
	$(PY) -m tests.soak --duration 300 --report docs/reliability.md

# Throughput, latency, concurrency and memory against ceilings measured in the same run (about 10-15 min);
# writes docs/bench/bench.json and docs/bench/bench.png. A wrong byte fails it; a missed target does not.
bench: install
	$(PY) bench/run.py --json docs/bench/bench.json --plot docs/bench/bench.png
	$(PY) bench/memory_policy.py --json docs/bench/memory_policy.json
	$(PY) bench/portable.py --json docs/bench/portable.json
	$(PY) bench/portable_gpu.py --json docs/bench/portable_gpu.json

lint: install
	$(VENV)/bin/ruff check proto memory client server tests examples bench
	$(VENV)/bin/ruff format --check proto memory client server tests examples bench

# Container images from docker/Dockerfile, tagged like the compose and Kubernetes files expect: $(IMAGE):VERSION
# (CPU, torch from the CPU index) and $(IMAGE):VERSION-cuda (CUDA 13.0 base, torch 2.13's CUDA build from PyPI).
# `docker build` where a Docker engine answers, else podman; IMAGE_VARIANTS=cpu builds one;
# DOCKER_BUILD_FLAGS="--build-context wheels=/opt/wheels" installs local wheels (the CPU torch) first.
IMAGE ?= initserve
IMAGE_VERSION ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' server/pyproject.toml)
IMAGE_VARIANTS ?= cpu cuda
CUDA_BASE_IMAGE ?= docker.io/nvidia/cuda:13.0.3-base-ubuntu22.04
CUDA_TORCH_INDEX_URL ?= https://pypi.org/simple
DOCKER_BUILD_FLAGS ?=

docker:
	@if docker info >/dev/null 2>&1; then build="docker build"; \
	elif podman info >/dev/null 2>&1; then build="podman build --format docker"; \
	else echo "make docker: no container engine answers. docker info: $$(docker info 2>&1 | tail -1);" \
		"podman info: $$(podman info 2>&1 | tail -1)" >&2; exit 1; fi; \
	for variant in $(IMAGE_VARIANTS); do \
		case $$variant in \
		cpu) tag=$(IMAGE):$(IMAGE_VERSION); args="";; \
		cuda) tag=$(IMAGE):$(IMAGE_VERSION)-cuda; \
			args="--build-arg BASE_IMAGE=$(CUDA_BASE_IMAGE) --build-arg TORCH_INDEX_URL=$(CUDA_TORCH_INDEX_URL)";; \
		*) echo "make docker: unknown variant '$$variant' (cpu, cuda)" >&2; exit 1;; \
		esac; \
		echo "$$build -f docker/Dockerfile -t $$tag $$args $(DOCKER_BUILD_FLAGS) ."; \
		$$build -f docker/Dockerfile -t $$tag $$args $(DOCKER_BUILD_FLAGS) . || exit 1; \
	done

# The CPU image built with podman from a debootstrapped Debian base (no registry needed), run read-only, and a
# client here checking served tensors byte for byte. Needs root, podman, runc, debootstrap; 2.5-3 min cold,
# 20-25 s warm (base and layers cached under build/container-test/ and in podman's store).
container-test: install
	PY=$(PY) bash docker/container-test.sh

clean:
	rm -rf $(VENV) $(STUBS) .pytest_cache .ruff_cache
