#!/usr/bin/env bash
# Copyright 2026 The capsule_ros Authors
# SPDX-License-Identifier: Apache-2.0
#
# Run a command in the project's environment: the venv, ROS 2 (system or wheels) and the
# colcon install tree. Usage: scripts/env.sh COMMAND [ARGS...]
# ROS_WHEELS=kilted (default) or jazzy picks the wheels' tree: .venv/ + install/, or
# .venv-jazzy/ + install-jazzy/ (see scripts/bootstrap.sh). Exported for the command:
# CAPSULE_BUILD_BASE, CAPSULE_INSTALL_BASE, CAPSULE_LOG_BASE (colcon's --build-base,
# --install-base, --log-base of that tree).
set -eo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
system_ros=false
if [[ -n "$ROS_DISTRO" && -f "/opt/ros/$ROS_DISTRO/setup.bash" ]]; then
  system_ros=true
  # shellcheck disable=SC1090
  source "/opt/ros/$ROS_DISTRO/setup.bash"
fi
# The tree of this distro (the same selection as scripts/bootstrap.sh; keep them in sync).
export ROS_WHEELS="${ROS_WHEELS:-kilted}"
case "$ROS_WHEELS" in
  kilted) tree_suffix='' ;;
  jazzy) tree_suffix='-jazzy' ;;
  *) echo "[env] ROS_WHEELS must be kilted or jazzy, not '$ROS_WHEELS'" >&2; exit 2 ;;
esac
if [[ $system_ros == true ]]; then tree_suffix=''; fi
export CAPSULE_BUILD_BASE="build$tree_suffix"
export CAPSULE_INSTALL_BASE="install$tree_suffix"
export CAPSULE_LOG_BASE="log$tree_suffix"
venv="${VENV:-$ROOT/.venv$tree_suffix}"
if [[ ! -f "$venv/bin/activate" ]]; then
  echo "[env] no venv at $venv: run 'make setup ROS_WHEELS=$ROS_WHEELS' first" >&2
  exit 1
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
if [[ -z "$ROS_DISTRO" ]]; then
  export CMAKE_PREFIX_PATH="$VIRTUAL_ENV${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
  export AMENT_PREFIX_PATH="$VIRTUAL_ENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
fi
if [[ -f "$CAPSULE_INSTALL_BASE/setup.bash" ]]; then
  # shellcheck disable=SC1090
  source "$CAPSULE_INSTALL_BASE/setup.bash"
fi
exec "$@"
