# The two commands of the README:  make install  ·  make test
# The edit loop:  make check (fast subset)  ·  make lint  ·  make typecheck   (CONTRIBUTING.md)
PY ?= python3

.PHONY: install test check lint layers typecheck bench-quick clean

install:
	# torch first. The pin gets the CPU build only where a local wheel cache (pip --find-links)
	# holds it; from plain PyPI it is the CUDA build: see README ("About the torch pin").
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q "setuptools>=64" wheel "cffi>=1.15"
	$(PY) -m pip install -q --no-build-isolation -e ".[test,serve,k8s]"
	# The native AscendCL front end (C, needs cc) and the real torch_npu in its isolated folder
	# (never this environment); without network the native path serves plain C programs only.
	$(PY) -m flexnpu.hook.native.build
	# The daemon's compiled executor of planned launches (C++, torch's headers); without it
	# the daemon runs them in Python, slower, and says so in its log.
	$(PY) -m flexnpu.daemon.optable.build || echo "warning: compiled plan executor not built; the daemon runs planned launches in Python"
	$(PY) -m flexnpu install-torch-npu || echo "warning: torch_npu not installed for FlexNPU (no network?); native torch_npu tests will skip"
	@if [ "$$(id -u)" = 0 ] && [ -x scripts/ci-system-deps.sh ]; then scripts/ci-system-deps.sh || true; fi

# Everything: lint, layering and types first (seconds), then the suite, then the tests that
# assert wall-clock behaviour, alone so that the rest of the suite does not load the machine
# under them.
test: install lint typecheck
	$(PY) -m pytest -q --timeout=600 -m "not timing"
	$(PY) -m pytest -q --timeout=600 -m timing

# The fast subset for the edit loop (under a minute on an idle 2-core machine).
check:
	$(PY) -m pytest -q --timeout=300 -m "not slow and not timing"

lint: layers
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# No import cycles and no arrow from a lower layer to a higher one (docs/architecture.md).
layers:
	$(PY) scripts/layers.py .

typecheck:
	$(PY) -m mypy

bench-quick:
	flexnpu bench ring --quick
	flexnpu bench call --quick

clean:
	rm -rf build *.egg-info flexnpu/ring/_core*.so flexnpu/daemon/_hot_core*.so flexnpu/hook/native/_lib .pytest_cache .mypy_cache .ruff_cache
