#!/usr/bin/env bash
# Copyright 2026 The capsule_ros Authors
# SPDX-License-Identifier: Apache-2.0
#
# Demo: start the policy node with the default config, run the planner scenario
# (scripts/planner_demo.py) against it over DDS, list the capsules with capsule_ctl, stop it.
# Call through scripts/env.sh (make demo does).
set -eo pipefail
export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
PREFIX="$(python -c "from ament_index_python.packages import get_package_prefix as p; \
print(p('capsule_ros'))")"
SHARE="$PREFIX/share/capsule_ros"

echo '[demo] starting policy_node'
"$PREFIX/lib/capsule_ros/policy_node" --ros-args --params-file "$SHARE/config/policy.yaml" &
node_pid=$!
stop_node() {
  if kill -0 "$node_pid" 2>/dev/null; then
    echo '[demo] stopping policy_node'
    kill -INT "$node_pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$node_pid" 2>/dev/null || break; sleep 0.1; done
    kill -TERM "$node_pid" 2>/dev/null || true
    wait "$node_pid" 2>/dev/null || true
  fi
}
trap stop_node EXIT

echo '[demo] running scripts/planner_demo.py'
python scripts/planner_demo.py
echo '[demo] the same store through the CLI: capsule_ctl list'
"$PREFIX/lib/capsule_ros/capsule_ctl" --timeout 30 list
echo '[demo] ok'
