#!/usr/bin/env bash
# Copyright 2026 The capsule_ros Authors
# SPDX-License-Identifier: Apache-2.0
#
# Run every colcon test target, print the results, exit non-zero on any failure.
# Call through scripts/env.sh (make test does).
set -o pipefail
start=$SECONDS
# Results of earlier runs would be counted again by colcon test-result.
colcon test-result --test-result-base build/capsule_ros --delete-yes > /dev/null 2>&1 || true
echo '[test] colcon test (targets: test_unit, test_engine, test_ros, test_lint)'
colcon test --packages-select capsule_ros --event-handlers console_direct+ \
  --return-code-on-test-failure \
  --ctest-args --output-on-failure
test_status=$?
echo '[test] colcon test-result --verbose'
colcon test-result --test-result-base build/capsule_ros --verbose
result_status=$?
echo "[test] finished in $(( SECONDS - start )) s"
if (( test_status != 0 || result_status != 0 )); then
  echo "[test] FAILED (colcon test: $test_status, test-result: $result_status)" >&2
  exit 1
fi
echo '[test] all test targets passed'
