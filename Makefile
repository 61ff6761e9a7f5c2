# capsule_ros: every target sets up what it needs by itself (idempotent; see
# scripts/bootstrap.sh), so `make test` and `make demo` work on a fresh clone.
SHELL := /bin/bash
.DEFAULT_GOAL := test
.PHONY: setup build test test-kilted test-jazzy demo bench clean

# ROS_WHEELS=kilted|jazzy: the ROS 2 distro of the PyPI wheels, each in its own venv and colcon
# tree (.venv/ build/ install/ log/, or .venv-jazzy/ build-jazzy/ install-jazzy/ log-jazzy/).
# Unset, `make test` runs two legs, Kilted then Jazzy; set, only that one. setup, build, demo
# and bench use it too (default kilted). A sourced system ROS 2 ($ROS_DISTRO with
# /opt/ros/$ROS_DISTRO, e.g. the Jetson's Jazzy) replaces the wheels: one leg, on it.
ifeq ($(origin ROS_WHEELS),undefined)
ROS_WHEELS := kilted
TEST_LEGS := kilted jazzy
# The second leg runs what depends on the distro: the generated interfaces (test_unit), the
# DDS tier and the linters. test_engine runs the runtime alone, which never imports rclpy.
# A TESTS= given to make applies to both legs.
ifeq ($(origin TESTS),undefined)
JAZZY_LEG_TESTS := test_unit test_ros test_lint
endif
else
TEST_LEGS := $(ROS_WHEELS)
endif
SYSTEM_ROS := $(and $(ROS_DISTRO),$(wildcard /opt/ros/$(ROS_DISTRO)/setup.bash))
ifneq ($(SYSTEM_ROS),)
TEST_LEGS := kilted
endif
export ROS_WHEELS

# The colcon test targets every leg runs (scripts/run_tests.sh's TEST_TARGETS); e.g.
# `make test-jazzy TESTS=test_ros` runs the build and the DDS tier on Jazzy only.
TESTS := test_unit test_engine test_ros test_lint

setup:
	@scripts/bootstrap.sh setup

build:
	@scripts/bootstrap.sh build

# Every leg runs even when an earlier one failed; make test fails when any leg failed.
# colcon test exits 0 even when tests fail: a leg's verdict is colcon test-result's exit status.
test:
	@status=0; summary=(); start=$$SECONDS; \
	for leg in $(TEST_LEGS); do \
	  leg_start=$$SECONDS; \
	  leg_tests='$(TESTS)'; \
	  if [[ $$leg == jazzy && -n '$(JAZZY_LEG_TESTS)' ]]; then leg_tests='$(JAZZY_LEG_TESTS)'; fi; \
	  if $(MAKE) --no-print-directory test-$$leg TESTS="$$leg_tests"; then verdict=passed; \
	  else verdict=FAILED; status=1; fi; \
	  name="$(if $(SYSTEM_ROS),system ROS 2 $(ROS_DISTRO),$$leg)"; \
	  summary+=("$$name: $$verdict ($$(( SECONDS - leg_start )) s)"); \
	done; \
	echo "[make test] $$(IFS=';'; echo "$${summary[*]}" | sed 's/;/; /g');" \
	  "total $$(( SECONDS - start )) s"; \
	exit $$status

# One leg: set-up + colcon build in that distro's tree, then the test targets.
test-kilted test-jazzy: test-%:
	@echo "[make test] leg $(if $(SYSTEM_ROS),system ROS 2 $(ROS_DISTRO),$*):" \
	  "set-up + colcon build, then $(TESTS)"
	@ROS_WHEELS=$* scripts/bootstrap.sh build
	@ROS_WHEELS=$* TEST_TARGETS='$(TESTS)' scripts/env.sh scripts/run_tests.sh

demo: build
	@scripts/env.sh scripts/demo.sh

bench:
	@scripts/bootstrap.sh bench
	@scripts/env.sh python bench/run_all.py
	@scripts/env.sh python bench/hybrids.py
	@scripts/env.sh python bench/speculative.py

clean:
	rm -rf build install log .stamps build-jazzy install-jazzy log-jazzy .stamps-jazzy
