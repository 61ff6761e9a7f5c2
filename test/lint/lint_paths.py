# Copyright 2026 The capsule_ros Authors
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Paths of the package's Python sources, shared by the lint tests."""

import pathlib

SOURCE_ROOT = pathlib.Path(__file__).resolve().parents[2]

# Directories whose *.py files are linted (those that exist), plus extension-less scripts.
PYTHON_DIRECTORIES = ['capsule_ros', 'launch', 'test', 'scripts', 'bench']
PYTHON_SCRIPTS = ['setup.py', 'scripts/policy_node', 'scripts/capsule_ctl']


def lint_paths():
    """Return the files and directories to lint, as strings."""
    paths = [SOURCE_ROOT / name for name in PYTHON_DIRECTORIES + PYTHON_SCRIPTS]
    return [str(path) for path in paths if path.exists()]


def python_files():
    """Return every Python file the linters see."""
    files = []
    for path in map(SOURCE_ROOT.joinpath, PYTHON_DIRECTORIES):
        files.extend(sorted(path.rglob('*.py')) if path.is_dir() else [])
    files.extend(SOURCE_ROOT / name for name in PYTHON_SCRIPTS)
    return [path for path in files if '__pycache__' not in path.parts]
