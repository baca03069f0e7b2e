# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
DEV_PKI = certs/dev
PYTEST_ARGS ?=

.PHONY: run test venv pki master-key audit-key check-config clean lint vcenter-session bench bench-audit bench-nvram bench-cluster bench-gateway demo conformance fuzz

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || \
	  { echo "kms-server needs Python 3.11 or newer (Debian 12: apt-get install python3)"; exit 1; }
	@$(PYTHON) -m venv $(VENV) || \
	  { echo "cannot create a virtualenv; on Debian run: apt-get install python3-venv"; exit 1; }
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $@

# make run, demo, vcenter-session: CONFIG= another KMS configuration, PORT= another
# KMIP port (0: a free one, which kms-server prints).
CONFIG ?= etc/kms-dev.toml
PORT ?=
PORT_FLAG = $(if $(PORT),--port $(PORT))

# The development PKI: the KMS's server certificate and the client identities
# of etc/kms-dev.toml (vcenter, admin, and auditor for the audit page).
# kms-admin pki init keeps what exists, so an older certs/dev gains the auditor.
pki: venv $(DEV_PKI)/ca.pem $(DEV_PKI)/auditor.pem

$(DEV_PKI)/ca.pem $(DEV_PKI)/auditor.pem &:
	$(BIN)/kms-admin pki init --dir $(DEV_PKI) --server-name localhost --client vcenter --client admin --client auditor

master-key: venv var/master.key

var/master.key:
	@mkdir -p var && chmod 700 var
	$(BIN)/kms-admin master-key new --out var/master.key

audit-key: venv var/audit.key

var/audit.key:
	@mkdir -p var && chmod 700 var
	$(BIN)/kms-admin audit key new --out var/audit.key

check-config: venv
	$(BIN)/kms-server --config etc/kms-dev.toml --check-config

run: venv pki master-key audit-key
	@$(BIN)/python tools/run_banner.py $(BIN)/kms-server --config $(CONFIG) $(PORT_FLAG)
	$(BIN)/kms-server --config $(CONFIG) $(PORT_FLAG)

# A captured vCenter 7.0.3 session replayed against `make run`'s node (the
# host and port of CONFIG, or PORT=); then
# kms-admin audit show --config etc/kms-dev.toml --vm test01
vcenter-session: venv
	$(BIN)/python tools/vcenter_session.py --config $(CONFIG) $(PORT_FLAG)

# In parallel with pytest-xdist (setup.cfg's test extra): one worker per core
# by default (PYTEST_WORKERS=auto; 0 runs the suite in this one process).
# --dist loadscope gives each test module to one worker as a whole, so a
# module's module-scoped KMS nodes, brokers, swtpm and PostgreSQL clusters are
# started once, not once per worker. --no-loadscope-reorder hands the modules
# out in collection order: xdist's default (most tests first) leaves the slow
# integration modules, which have few tests each, for the end, one worker
# busy and the other idle; in collection order they run in the middle and the
# many short unit modules of tests/kms_server fill the end. Nothing needs a
# serial pass: every test takes free ports, its own tmp_path, its own
# PostgreSQL database and (per worker process) its own SoftHSM2 token
# directory (tests/softhsm.py).
PYTEST_WORKERS ?= auto
test: venv
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadscope --no-loadscope-reorder $(PYTEST_ARGS)

# The OASIS KMIP profile test flows (1.4, 2.0, 2.1; mandatory and optional)
# against a server of its own: figures per version and set, and the list of
# flows in build/conformance.txt (docs/conformance.md explains the failures).
conformance: venv
	$(BIN)/python tests/conformance/runner.py $(CONFORMANCE_ARGS)

# The disaster-recovery drill: a KMS, the broker, 2 hosts and 10 VMs with a
# real vTPM each; the management plane is lost and every vTPM recovered.
# The drill starts a KMS, a broker and hosts of its own on free 127.0.0.1
# ports; PORT= puts its KMS on that port instead. It writes its own KMS
# configuration, so a CONFIG= other than the default is refused, not ignored.
# DEMO_ARGS: more vtpm-drill options (--vms, --lose management,broker, --json).
demo: venv
	@$(if $(filter-out etc/kms-dev.toml,$(CONFIG)),echo "make demo: the drill writes its own KMS configuration; CONFIG= is for make run and make vcenter-session (PORT= sets the drill's KMS port)"; exit 2)
	$(BIN)/vtpm-drill --vms 10 --hosts 2 $(if $(PORT),--kms-port $(PORT)) $(DEMO_ARGS)

# Style, and the structure of docs/architecture.md: the import contracts
# (.importlinter: kmip_core imports neither service, the services never import
# each other, the KMS's layers, no cycles) and no private name imported from
# another module (ruff's PLC2701); and the types (mypy, setup.cfg [mypy]).
lint: $(VENV)/.lint-installed
	$(BIN)/ruff check kmip_core kms_server broker tests bench tools
	$(BIN)/ruff check --preview --select PLC2701 kmip_core kms_server broker
	$(BIN)/lint-imports
	$(BIN)/mypy kmip_core kms_server broker

$(VENV)/.lint-installed: $(VENV)/.installed setup.cfg
	$(BIN)/pip install --quiet -e '.[lint]'
	@touch $@

# Every workload as kms-server / PyKMIP's server / the ceiling of kms-server's
# stack (bench/ceiling_server.py), in one run (bench/README.md).
bench: venv
	$(BIN)/python -c 'import rich' 2>/dev/null || $(BIN)/pip install --quiet rich
	$(BIN)/python bench/kmip_throughput.py $(BENCH_ARGS)

# What the audit trail costs: kms-server with and without it, and PyKMIP.
bench-audit: venv
	$(BIN)/python bench/kmip_throughput.py --servers kms-server,kms-no-audit,PyKMIP --workloads create-get,vcenter-mix $(BENCH_ARGS)

bench-nvram: venv
	$(BIN)/python bench/nvram_seal.py

# Every workload of `make bench` through 1 and 3 kms-server nodes on PostgreSQL
# with a synchronous standby (bench/README.md); about 5 minutes on 2 cores.
bench-cluster: venv
	$(BIN)/python -c 'import rich' 2>/dev/null || $(BIN)/pip install --quiet rich
	$(BIN)/python bench/cluster_throughput.py $(BENCH_CLUSTER_ARGS)

bench-gateway: venv
	$(BIN)/python bench/gateway_decrypt.py

# The fuzz properties at FUZZ_SCALE times the examples of `make test`, then
# a two-minute campaign of mutated messages against a real kms-server
# (bench/README.md, "fuzz_campaign.py"). FUZZ_ARGS: e.g. --target broker-api.
FUZZ_SCALE ?= 10
fuzz: venv
	KMS_FUZZ_PROFILE=fuzz-long KMS_FUZZ_SCALE=$(FUZZ_SCALE) $(BIN)/python -m pytest -q tests/fuzz
	$(BIN)/python tools/fuzz_campaign.py --seconds 120 $(FUZZ_ARGS)

clean:
	rm -rf $(VENV) *.egg-info
