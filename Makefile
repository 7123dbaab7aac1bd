# fsw: `make install` sets everything up on a fresh machine, `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
NODE_TESTS := tests/node

.PHONY: install system-deps install-gpu test lint bench bench-quick gpu-check reliability clean

install: system-deps $(VENV)/.installed
	$(PY) -m matcher.onnx_convert
	cd $(NODE_TESTS) && npm ci --silent --no-audit --no-fund

# The tests need redis-server and Node.js (the portal's BullMQ client); install them where apt can.
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	command -v npm >/dev/null 2>&1 || missing="$$missing nodejs npm"; \
	if [ -n "$$missing" ]; then \
		if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
		else echo "please install:$$missing (e.g. sudo apt-get install$$missing)"; exit 1; fi; \
	fi

# dlib-bin is a prebuilt dlib; face_recognition goes in with --no-deps so pip never compiles the dlib sdist.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools<81" wheel
	$(PIP) install -q "dlib-bin>=20.0.1" "face-recognition-models>=0.3.0"
	$(PIP) install -q --no-deps "face_recognition==1.3.0"
	$(PIP) install -q -e ".[dev]"
	touch $@

# FAISS and ONNX Runtime on CUDA: every FAISS wheel installs the same `faiss` module, so the CPU
# wheels go first.
install-gpu: install
	$(PIP) install -q -e ".[gpu]"
	$(PIP) uninstall -q -y faiss-cpu onnxruntime
	$(PIP) install -q --force-reinstall --no-deps "faiss-gpu>=1.15.1" "onnxruntime-gpu>=1.18"

test:
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check . || true

bench:
	$(PY) -m bench.run

bench-quick:
	$(PY) -m bench.run --quick

# After `make install-gpu`, on an NVIDIA GPU: the GPU tests, and GPU-vs-CPU search at 1M and 10M faces
# (bench/gpu-results.json); under 5 minutes.
gpu-check:
	$(PY) -m bench.gpu_check

reliability:
	$(PY) -m pytest -q tests/reliability --reliability-full

clean:
	rm -rf $(VENV) $(NODE_TESTS)/node_modules .pytest_cache .ruff_cache
