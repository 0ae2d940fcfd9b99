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

MODULES   := incus_nftables_render firewall_router_apply
# Static binaries: a binary module must run on targets without our libc
# (busybox containers, the firewall VM) and needs only /bin/sh there.
RUSTFLAGS_STATIC := -C target-feature=+crt-static
TARGET    := x86_64-unknown-linux-gnu
SCENARIOS := host_isolation policies domain_edges
# `make nftables-deploy CHECK=1` is the dry run: validate and show the diff,
# install nothing.
CHECK_ARGS := $(if $(CHECK),--check --diff,)

.PHONY: help
help:
	@echo "make demo            lab up, render in the anklume container, apply on the host, reachability matrix"
	@echo "make test            every test: fmt, clippy, unit, golden, netns, ansible-lint, molecule"
	@echo "make build           build the binary modules into library/"
	@echo "make nftables        render the ruleset inside the anklume container (changes nothing on the host)"
	@echo "make nftables-deploy pull the rendered file from the container, validate and apply it (CHECK=1: dry run)"
	@echo "make matrix          print the lab's reachability matrix (real traffic)"
	@echo "make bench           render and apply benchmarks"
	@echo "make bench-forwarding  forwarding rates through 1000 domains, side by side"
	@echo "make lab-up | lab-down | lab-status"

# --- set-up ------------------------------------------------------------------

.PHONY: deps
deps:
	lab/lab.sh install

.PHONY: build
build:
	RUSTFLAGS='$(RUSTFLAGS_STATIC)' cargo build --release --locked --target $(TARGET) --bins
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
matrix:
	python3 lab/reach.py matrix

demo: lab-up build
	ansible-playbook playbooks/site.yml
	python3 lab/reach.py matrix

# --- tests ---------------------------------------------------------------------

.PHONY: test lint unit molecule
test: deps lint unit build molecule

lint:
	cargo fmt --all -- --check
	cargo clippy --locked --all-targets -- -D warnings
	ansible-lint

# Unit, property, golden (nft -c in a throwaway namespace) and the apply
# tests in named network namespaces (root).
unit:
	cargo test --locked

molecule: build
	for s in $(SCENARIOS); do molecule test -s $$s; done

.PHONY: bench bench-forwarding
# Forwarding through 1000 domains: sets vs no ruleset vs the linear designs
# (network namespaces made and removed by the script).
bench-forwarding:
	bench/forwarding.sh
bench:
	cargo build --release --locked --bins
	cargo bench --locked --bench render
