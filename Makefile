# capsule_ros: every target sets up what it needs by itself (idempotent; see
# scripts/bootstrap.sh), so `make test` and `make demo` work on a fresh clone.
SHELL := /bin/bash
.DEFAULT_GOAL := test
.PHONY: setup build test demo bench clean

setup:
	@scripts/bootstrap.sh setup

build:
	@scripts/bootstrap.sh build

# colcon test exits 0 even when tests fail: the verdict is colcon test-result's exit status.
test: build
	@scripts/env.sh scripts/run_tests.sh

demo: build
	@scripts/env.sh scripts/demo.sh

bench:
	@scripts/bootstrap.sh bench
	@scripts/env.sh python bench/run_all.py
	@scripts/env.sh python bench/hybrids.py

clean:
	rm -rf build install log .stamps
