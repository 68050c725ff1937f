# The two commands of the README: `make demo` runs the main job on an embedded default,
# `make test` runs every check. Both create their own virtualenv and install what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: demo test constraints lint typecheck unit db db-pooler cluster browser chaos node controlplane node-tools \
	helm tools wheels system-packages bench image \
	image-buildah deploy-manifests clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# The bench extra (pgqueuer, procrastinate, psycopg, pyinstrument): the benchmarks run with it
# and mypy checks bench/ against its real types.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,bench]'
	touch $(BENCH_STAMP)

# Pin what a green `make test` ran with: a new release of a dependency cannot turn CI red
# (warnings are errors) without a change here.
constraints: $(STAMP)
	{ echo "# Versions make test and make demo install (pip -c). Every test ran green with these."; \
	  echo "# Regenerate after changing dependencies: make constraints"; \
	  $(BIN)/pip freeze --exclude-editable | grep -v '^#' | grep -v '^-e' | sort -f; } > constraints.txt

demo: $(STAMP)
	$(BIN)/analysisq demo

# Go-built tools, cached under ~/.cache/analysisq (ANALYSISQ_CACHE) and rebuilt only when missing.
controlplane:
	bash tests/controlplane/build.sh

# kubelet, kube-proxy, kube-scheduler and the pod sandbox image of the real node.
node-tools:
	bash tests/controlplane/build.sh node

helm:
	bash tests/tools/build-helm.sh

tools: controlplane node-tools helm

# The image's dependencies as wheels under ~/.cache/analysisq/wheels, keyed by constraints.txt
# and pyproject.toml: the builder-stage test (tests/cluster/test_chart_image.py) installs
# from them offline. Filled from PyPI once per machine, before any test's timeout starts.
wheels: $(STAMP)
	$(BIN)/python tests/wheelhouse.py

# Debian packages the real tiers run (pgbouncer, chromium, containerd, runc, CNI, buildah).
system-packages:
	bash tests/tools/system-packages.sh

lint: $(STAMP)
	$(BIN)/ruff check operator tests bench
	$(BIN)/ruff format --check operator tests bench
	$(BIN)/lint-imports
	$(BIN)/hadolint Dockerfile

typecheck: $(BENCH_STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -m unit

db: $(STAMP)
	$(BIN)/pytest -m db

# The db tier again, every test database reached through a real PgBouncer in transaction mode
# (tests/pooler.py); the chaos tier's PgBouncer restart test runs in `make chaos`.
db-pooler: $(STAMP) system-packages
	$(BIN)/pytest -m db --pooler pgbouncer

cluster: $(STAMP) tools wheels
	ANALYSISQ_CONTROLPLANE_BIN="$$(bash tests/controlplane/build.sh | tail -1)" \
	ANALYSISQ_HELM="$$(bash tests/tools/build-helm.sh | tail -1)" $(BIN)/pytest -m cluster

chaos: $(STAMP)
	$(BIN)/pytest -m chaos

# The dashboard in Debian's headless Chromium (tests/tools/system-packages.sh installs it).
browser: $(STAMP)
	$(BIN)/pytest -m browser

# The image (built here with buildah) and the chart on a real kubelet + containerd + runc node.
node: $(STAMP) system-packages tools wheels
	ANALYSISQ_CONTROLPLANE_BIN="$$(bash tests/controlplane/build.sh | tail -1)" \
	ANALYSISQ_NODE_BIN="$$(bash tests/controlplane/build.sh node | tail -1)" \
	ANALYSISQ_HELM="$$(bash tests/tools/build-helm.sh | tail -1)" $(BIN)/pytest -m node

# Every tier, then the db tier through PgBouncer; a tier that cannot run fails
# (tests/conftest.py refuses to skip).
test: $(STAMP) system-packages tools wheels lint typecheck
	ANALYSISQ_CONTROLPLANE_BIN="$$(bash tests/controlplane/build.sh | tail -1)" \
	ANALYSISQ_NODE_BIN="$$(bash tests/controlplane/build.sh node | tail -1)" \
	ANALYSISQ_HELM="$$(bash tests/tools/build-helm.sh | tail -1)" $(BIN)/pytest
	$(BIN)/pytest -m db --pooler pgbouncer

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench all

image:
	docker build -t analysisq:0.1.0 .

# Without a Docker engine: buildah (Debian) on a debootstrap base; see tests/tools/build-image.sh.
image-buildah:
	bash tests/tools/build-image.sh

# Regenerate deploy/analysisq.yaml from the chart (a test fails when it is stale).
deploy-manifests: $(STAMP) helm
	$(BIN)/python tests/tools/helm.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
