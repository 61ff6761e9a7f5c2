#!/usr/bin/env bash
# Copyright 2026 The capsule_ros Authors
# SPDX-License-Identifier: Apache-2.0
#
# Run a command in the project's environment: the venv, ROS 2 (system or wheels) and the
# colcon install tree. Usage: scripts/env.sh COMMAND [ARGS...]
set -eo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -n "$ROS_DISTRO" && -f "/opt/ros/$ROS_DISTRO/setup.bash" ]]; then
  # shellcheck disable=SC1090
  source "/opt/ros/$ROS_DISTRO/setup.bash"
fi
# shellcheck disable=SC1091
source "${VENV:-$ROOT/.venv}/bin/activate"
if [[ -z "$ROS_DISTRO" ]]; then
  export CMAKE_PREFIX_PATH="$VIRTUAL_ENV${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
  export AMENT_PREFIX_PATH="$VIRTUAL_ENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
fi
if [[ -f install/setup.bash ]]; then
  # shellcheck disable=SC1091
  source install/setup.bash
fi
exec "$@"
