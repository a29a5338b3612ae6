# libvirt-rdm-backup: build, lab and test entry points. Everything goes through tools/lab.sh,
# the same script CI (.ci/run) and the Vagrant box (vagrant/Vagrantfile) use.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.NOTPARALLEL:
.DEFAULT_GOAL := help

VENV := .venv
PY := $(VENV)/bin/python
LAB := tools/lab.sh

.PHONY: help install lab-up lab-down lint test faults demo bench man clean distclean

help:
	@echo "make demo       install everything, bring up the lab, run a real backup and restore"
	@echo "make test       install everything, bring up the lab, lint, run the tests"
	@echo "make install    Debian packages + the venv at $(VENV)/ (idempotent)"
	@echo "make lab-up     start virtlogd+libvirtd, tgtd on 127.0.0.1:3260, a one-node Ceph (idempotent)"
	@echo "make lab-down   stop the lab, remove leftover rdmb* domains, targets, loop devices, Ceph"
	@echo "make lint       ruff + mypy"
	@echo "make faults     only the fault and bad-input suite (make test runs it too)"
	@echo "make bench      run tools/bench (python -m tools.bench) against the lab"
	@echo "make man        regenerate the man page docs/rdm-backup.1 from the argument parser"
	@echo "make clean      remove caches and build artefacts (distclean: also the venv)"

install:
	$(LAB) install

lab-up: install
	$(LAB) up

lab-down:
	$(LAB) down

lint: install
	$(VENV)/bin/ruff check libvirt_rdm_backup tests tools
	$(VENV)/bin/mypy

# Lint and tests both run; the target fails if either fails (or if no test ran). The tests run
# in $(TEST_WORKERS) workers (pytest-xdist, a module's tests in one worker), then those marked
# `serial` alone; the last lines are the whole suite's fault summary and count.
TEST_WORKERS ?= 3
test: install lab-up
	@lint=0; $(MAKE) --no-print-directory lint || lint=$$?; \
	tally=$$(mktemp /var/tmp/rdmb-tally.XXXXXX); trap 'rm -f "$$tally"' EXIT; rc=0; \
	RDMB_SUITE_TALLY=$$tally $(VENV)/bin/pytest -q --durations=30 -n $(TEST_WORKERS) \
		--dist loadfile -m "not serial" tests || rc=$$?; \
	RDMB_SUITE_TALLY=$$tally $(VENV)/bin/pytest -q --durations=10 -m serial tests || rc=$$?; \
	$(PY) -m tests.suite_report "$$tally" || { [ "$$rc" != 0 ] || rc=1; }; \
	if [ "$$rc" != 0 ]; then exit "$$rc"; fi; \
	if [ "$$lint" != 0 ]; then echo "make test: the tests passed but lint failed" >&2; exit 1; fi

# The fault, bad-input and hostile-input suite alone; its summary (faults survived / tried, bad inputs
# refused / tried) ends the output of this target and of `make test`.
faults: install lab-up
	$(VENV)/bin/pytest -q -m "fault or bad_input or hostile" tests

demo: install lab-up
	$(PY) tools/demo.py

bench: install lab-up
	$(PY) -m tools.bench

# The man page rdm-backup(1), generated from the argument parser; a unit test checks that the
# committed page is current. Needs only the venv (made by `make install` when it is missing).
man: | $(PY)
	$(PY) tools/manpage.py --output docs/rdm-backup.1

$(PY):
	$(LAB) install

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
