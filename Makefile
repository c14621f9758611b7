# The README's two commands: `make demo` and `make test` (+ `make test-fast` while developing). All set up .venv
# first when needed.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# DeepSpeed JIT-builds its C++ ops on first use (~1 min on 2 cores): keep them across runs.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/distclm/torch_extensions

.PHONY: setup demo test test-fast test-all bench lint clean image image-gpu image-test

setup: $(STAMP)

# Everything installs through constraints.txt: pinned, tested versions; torch 2.13.0 CPU where no GPU torch is present.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# The embedded offline default: pydoc corpus -> gpt2-tiny, 2 CPU processes with ZeRO-2 -> eval -> export -> sample.
demo: setup
	$(VENV)/bin/distclm run --preset=demo

# CI's tier: every guarantee on at least one strategy, preset and launcher (the `extended` variants are left to
# test-all, which runs everything; the tiers: tests/README.md).
test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q --durations=30 -m "not extended" tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests were collected" >&2; fi; exit $$rc

# The developer's tier: every single-process test that is quick (unit, deploy, most of e2e), about a minute;
# the multi-process ones are marked `slow` (tests/conftest.py).
test-fast: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q --durations=10 -m "not slow and not extended" tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-fast: no tests were collected" >&2; fi; exit $$rc

test-all: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-all: no tests were collected" >&2; fi; exit $$rc

bench: setup
	$(PY) bench/prepare.py

# Style and import order (ruff, from the [dev] extra), and pyflakes-level errors.
lint: setup
	$(VENV)/bin/ruff check distclm tests bench

# The CPU image with docker or podman, whichever works (podman is installed from apt when missing; a base image
# that cannot be pulled is stood in for from Debian packages): docker/build.sh, docs/containers.md.
image:
	docker/build.sh cpu

# The GPU variant FROM the same Python base, PyPI's CUDA torch (~2.7 GB of wheels); builds without a GPU.
image-gpu:
	docker/build.sh gpu

# Runs the built image for real (not part of `make test`): --help, doctor, the demo, a 2-node job across two
# containers (losses vs 2 local processes, a killed container resumed), the Kubernetes pod specs played.
image-test: image
	bash -c 'source docker/engine.sh && pick_engine && OMP_NUM_THREADS=1 exec python3 tests/image/check_image.py'

clean:
	rm -rf data runs bench/out
