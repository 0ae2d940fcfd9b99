# anklume-isolation: every entry point an operator or CI needs.
#
#   make demo    bring the lab up, render + deploy the isolation, print who reaches whom
#   make test    lint, unit, golden, netns and molecule tests (installs what is missing)
#
# Everything runs as root on a Debian 12 host (Incus, nftables, network
# namespaces). The lab touches only objects named anklume-lab / lab-net-*.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

VENV      ?= /opt/anklume-lab/venv
export PATH := $(VENV)/bin:$(or $(HOME),/root)/.cargo/bin:$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
# Every cargo call goes through lab/cargo: the first toolchain that can build
# the crate (rust-version, fmt, clippy), the one on PATH or Debian's
# rustc-web/cargo-web that `make deps` installs when there is none.
CARGO := $(CURDIR)/lab/cargo

MODULES   := incus_nftables_render firewall_router_apply incus_firewall_vm_profile firewall_vm_routing
# Static binaries: a binary module must run on targets without our libc
# (busybox containers, the firewall VM) and needs only /bin/sh there.
RUSTFLAGS_STATIC := -C target-feature=+crt-static
TARGET    := x86_64-unknown-linux-gnu
SCENARIOS := host_isolation policies domain_edges firewall_vm
# `make nftables-deploy CHECK=1` is the dry run: validate and show the diff,
# install nothing.
CHECK_ARGS := $(if $(CHECK),--check --diff,)
# `make demo FIREWALL_MODE=vm`: the firewall instance routes and enforces
# between domains (the lab's Debian container stands in for the VM).
# Empty: the mode comes from the inventory or infra.yml (host by default).
FIREWALL_MODE ?=
# The matrix's instances (the firewall has no eth0 to probe).
MATRIX_INSTANCES := anklume-instance,anklume-probe,pro-dev,pro-web,perso-desk

.PHONY: help
help:
	@echo "make demo            lab up, render in the anklume container, apply on the host, reachability matrix"
	@echo "                     FIREWALL_MODE=vm: through the firewall instance (vm mode)"
	@echo "make test            every test: fmt, clippy, unit, golden, netns, ansible-lint, shellcheck, ruff, reach.py unit, toolchain choice, lab forwarding restore, molecule"
	@echo "make lint            fmt, clippy, ansible-lint, shellcheck, ruff, reach.py unit tests"
	@echo "make test-toolchain  build the modules with Debian's Rust toolchain alone (hides ~/.cargo/bin)"
	@echo "make test-toolchain-chroot  the same in a clean debootstrapped Debian 12"
	@echo "make deps            install what is missing (apt packages, Incus, the venv, a Rust toolchain)"
	@echo "make test-stress     1000 re-applies under traffic: 0 allowed dropped, 0 denied leaked"
	@echo "make build           build the binary modules into library/"
	@echo "make nftables        render the ruleset inside the anklume container (changes nothing on the host)"
	@echo "make nftables-deploy pull the rendered file from the container, validate and apply it (CHECK=1: dry run)"
	@echo "make matrix          the lab's reachability matrix (real traffic) beside the render's report; fails where they disagree"
	@echo "make bench           render and apply benchmarks"
	@echo "make bench-forwarding  forwarding rates through 1000 domains, side by side"
	@echo "make lab-up | lab-down | lab-status"

# --- set-up ------------------------------------------------------------------

.PHONY: deps
deps:
	lab/lab.sh install

.PHONY: build
build:
	RUSTFLAGS='$(RUSTFLAGS_STATIC)' $(CARGO) build --release --locked --target $(TARGET) --bins
	install -d library
	for m in $(MODULES); do install -m 0755 target/$(TARGET)/release/$$m library/$$m; done

# --- the lab -----------------------------------------------------------------

.PHONY: lab-up lab-down lab-status record-fixtures
lab-up: deps
	lab/lab.sh up
lab-down:
	lab/lab.sh down
lab-status:
	lab/lab.sh status
# Re-record the Incus JSON the tests parse (tests/fixtures/incus/) from the
# lab's real daemon (after lab-up; read-only on Incus).
record-fixtures:
	lab/record-fixtures.sh

# --- the main job ------------------------------------------------------------

.PHONY: nftables nftables-deploy site matrix demo
nftables: build
	ansible-playbook playbooks/nftables.yml $(CHECK_ARGS)
nftables-deploy: build
	ansible-playbook playbooks/nftables-deploy.yml $(CHECK_ARGS)
site: build
	ansible-playbook playbooks/site.yml $(CHECK_ARGS)
# The real-traffic matrix beside the render's report for the same inputs as
# the deployed ruleset (lab/report.yml, check mode); fails on any cell where
# they disagree. Needs the lab up and the ruleset deployed (make demo).
# In vm mode the report would only describe the host's strict table, not the
# firewall instance's policies: real traffic alone is printed.
REPORT_FILE := /run/anklume-lab/reachability.json
matrix: build
ifeq ($(FIREWALL_MODE),vm)
	@echo "vm mode: the render's report covers the host's table, not the firewall instance's policies; real traffic only"
	python3 lab/reach.py matrix --instances $(MATRIX_INSTANCES)
else
	ansible-playbook lab/report.yml --check -e reach_report_file=$(REPORT_FILE) $(if $(FIREWALL_MODE),-e firewall_mode=$(FIREWALL_MODE)) \
		>$(REPORT_FILE).log || { cat $(REPORT_FILE).log; exit 1; }
	python3 lab/reach.py matrix --instances $(MATRIX_INSTANCES) --report $(REPORT_FILE)
endif

demo: lab-up build
	$(if $(filter vm,$(FIREWALL_MODE)),lab/lab.sh firewall)
	ansible-playbook playbooks/site.yml $(if $(FIREWALL_MODE),-e firewall_mode=$(FIREWALL_MODE))
	$(MAKE) --no-print-directory matrix

# --- tests ---------------------------------------------------------------------

.PHONY: test lint unit molecule script-tests test-toolchain test-toolchain-chroot
test: deps lint script-tests unit build molecule

SHELL_SCRIPTS := $(wildcard lab/*.sh bench/*.sh tests/*.sh) lab/cargo .ci/run

# Every language in the repo: Rust, Ansible, shell, the lab's Python (ruff,
# and the unit tests of reach.py's pure parts, which need no lab).
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings
	ansible-lint
	shellcheck $(SHELL_SCRIPTS)
	ruff check lab/
	python3 -m unittest discover -s lab -p 'test_*.py'

# Shell-level tests, seconds: the Rust toolchain choice as a machine without
# rustup sees it (PATH without ~/.cargo/bin; it installs Debian's toolchain
# when missing, even where rustup is used), and lab.sh's forwarding restore
# on a throwaway namespace's sysctls. test-toolchain also builds the static
# modules with Debian's toolchain alone (~2 min, not part of `make test`).
script-tests:
	tests/toolchain.sh
	tests/lab_forwarding.sh
test-toolchain:
	tests/toolchain.sh --build
# A clean debootstrapped Debian 12 (chroot): the toolchain step of `make
# deps`, `make build`, fmt and clippy there (~5 min, Debian's mirror and
# crates.io; not part of `make test`).
test-toolchain-chroot:
	tests/toolchain-chroot.sh

# Unit, property, golden (nft -c in a throwaway namespace) and the apply
# tests in named network namespaces (root).
unit:
	$(CARGO) test --locked

molecule: build
	for s in $(SCENARIOS); do molecule test -s $$s; done

# >= 1000 re-applies under real traffic in throwaway namespaces (root): set-
# only updates drop no allowed datagram and leak no denied one; whole-table
# swaps are measured too. STRESS_APPLIES / STRESS_SWAPS change the counts.
.PHONY: test-stress
test-stress:
	$(CARGO) test --locked --test apply_netns -- --ignored --nocapture stress

.PHONY: bench bench-forwarding
.PHONY: bench bench-forwarding bench-firewall-vm
# Through the firewall instance (vm mode) vs host-mode routing, on the lab
# (run it under the lab lock when the lab is shared).
bench-firewall-vm: build
	bench/firewall-vm.sh
# Forwarding through 1000 domains: sets vs no ruleset vs the linear designs
# (network namespaces made and removed by the script).
bench-forwarding:
	bench/forwarding.sh
bench:
	$(CARGO) build --release --locked --bins
	$(CARGO) bench --locked --bench render
