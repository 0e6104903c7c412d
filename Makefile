# Two commands for a fresh machine: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEB_PACKAGES := wireguard-go wireguard-tools qemu-system-x86 qemu-utils iproute2 iputils-ping

.PHONY: run test lint bench system-deps bytecode clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Compiled once here: every `ppn` start (a node's cold start too) then skips compiling
# ~11k lines, which PYTHONDONTWRITEBYTECODE would otherwise make it do each time.
bytecode: $(STAMP)
	@$(PY) -m compileall -q ledger actors sims

# As root, install the Debian packages the real-component tests need.
system-deps:
	@if [ "$$(id -u)" -ne 0 ]; then \
		echo "not root: not installing Debian packages ($(DEB_PACKAGES))"; \
	elif ! command -v apt-get >/dev/null; then \
		echo "no apt-get: install $(DEB_PACKAGES) by hand"; \
	else \
		missing=""; \
		for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
		if [ -n "$$missing" ]; then \
			apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; \
		fi; \
	fi

# The main job so far: initialise a node in a fresh state directory, audit and print its ledger,
# then run it: its seven PDs answer through the capability kernel, and SIGTERM stops it cleanly.
# RUN_DIR=... keeps it somewhere of your choosing.
run: $(STAMP) bytecode
	@set -e; dir="$${RUN_DIR:-$$(mktemp -d -t ppn-run-XXXXXX)}"; ppn=$(VENV)/bin/ppn; \
	set -x; \
	$$ppn node init --state-dir "$$dir/node" --name laptop-b --role hub --mesh-ip 10.8.0.1; \
	$$ppn ledger verify "$$dir/node/ledger"; \
	$$ppn ledger show "$$dir/node/ledger"; \
	$$ppn ledger state "$$dir/node/ledger"; \
	$$ppn ledger checkpoint "$$dir/node/ledger" | tee "$$dir/kept.note"; \
	{ set +x; } 2>/dev/null; \
	$$ppn node run --state-dir "$$dir/node" 2>"$$dir/node.log" & pid=$$!; \
	for i in $$(seq 50); do [ -S "$$dir/node/control.sock" ] && break; sleep 0.1; done; \
	set -x; \
	$$ppn node status --state-dir "$$dir/node"; \
	$$ppn node ping --state-dir "$$dir/node" pd-vmm; \
	$$ppn net links --state-dir "$$dir/node"; \
	$$ppn caps tree --state-dir "$$dir/node"; \
	kill -TERM $$pid; wait $$pid; \
	$$ppn ledger verify "$$dir/node/ledger" --against "$$dir/kept.note"; \
	{ set +x; } 2>/dev/null; echo "state directory kept at $$dir/node (node log: $$dir/node.log)"; \
	echo; echo "== the three-node WireGuard mesh (laptop-b the hub), each node in its own namespace"; \
	$(PY) -m actors.mesh_demo "$$dir/mesh"

test: $(STAMP) system-deps bytecode
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check ledger actors sims tests bench
	$(VENV)/bin/mypy

bench: $(STAMP) bytecode
	$(PY) bench/ledger_bench.py
	$(PY) bench/kernel_bench.py
	$(PY) bench/mesh_bench.py
	$(PY) bench/vm_bench.py
	$(PY) bench/genesis_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
