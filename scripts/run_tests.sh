#!/usr/bin/env bash
# Copyright 2026 The capsule_ros Authors
# SPDX-License-Identifier: Apache-2.0
#
# Run the colcon test targets, print the results, exit non-zero on any failure.
# Call through scripts/env.sh (make test does), which picks the tree of ROS_WHEELS.
#   TEST_TARGETS='test_unit test_ros'   run only these targets (default: all four)
#   PYTEST_ADDOPTS='--ignore=...'        passed on to every target's pytest (pytest reads it)
set -o pipefail
start=$SECONDS
build_base="${CAPSULE_BUILD_BASE:-build}"
install_base="${CAPSULE_INSTALL_BASE:-install}"
log_base="${CAPSULE_LOG_BASE:-log}"
results="$build_base/capsule_ros"
targets="${TEST_TARGETS:-test_unit test_engine test_ros test_lint}"
read -r -a target_list <<< "$targets"
if (( ${#target_list[@]} == 0 )); then
  echo '[test] TEST_TARGETS is empty' >&2
  exit 2
fi
ctest_regex="^($(IFS='|'; echo "${target_list[*]}"))\$"
label="${ROS_WHEELS:-kilted}"
if [[ -n "$ROS_DISTRO" && -f "/opt/ros/$ROS_DISTRO/setup.bash" ]]; then
  label="system ROS 2 $ROS_DISTRO"
fi
# Results of earlier runs would be counted again by colcon test-result.
colcon test-result --test-result-base "$results" --delete-yes > /dev/null 2>&1 || true
addopts=''
if [[ -n $PYTEST_ADDOPTS ]]; then addopts=" (PYTEST_ADDOPTS: $PYTEST_ADDOPTS)"; fi
echo "[test] $label: colcon test in $build_base/ (targets: ${target_list[*]})$addopts"
colcon --log-base "$log_base" test --packages-select capsule_ros \
  --build-base "$build_base" --install-base "$install_base" --test-result-base "$build_base" \
  --event-handlers console_direct+ \
  --return-code-on-test-failure \
  --ctest-args --output-on-failure -R "$ctest_regex"
test_status=$?
echo "[test] $label: colcon test-result --verbose"
colcon test-result --test-result-base "$results" --verbose
result_status=$?
# Every requested target must have run and left its result (ctest -R matching nothing, or a
# target that died before writing its XML, must not pass silently).
missing=()
for target in "${target_list[@]}"; do
  [[ -f "$results/test_results/capsule_ros/$target.xunit.xml" ]] || missing+=("$target")
done
echo "[test] $label: finished in $(( SECONDS - start )) s"
if (( test_status != 0 || result_status != 0 || ${#missing[@]} )); then
  verdict="colcon test: $test_status, test-result: $result_status"
  if (( ${#missing[@]} )); then verdict+=", no result: ${missing[*]}"; fi
  echo "[test] $label: FAILED ($verdict)" >&2
  exit 1
fi
echo "[test] $label: all test targets passed (${target_list[*]})"
