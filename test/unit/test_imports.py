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
"""The installed tree imports: generated interfaces, the ROS layer, every runtime module."""

import ast
import importlib
import pathlib
import pkgutil

import capsule_ros
import pytest

PACKAGE_DIR = pathlib.Path(capsule_ros.__path__[0])
INTERFACES = {
    'capsule_ros.msg': ['CapsuleEvent', 'CapsuleInfo', 'SamplingParams'],
    'capsule_ros.srv': [
        'Append', 'Branch', 'CloseSession', 'ListCapsules', 'LoadCapsule', 'ReleaseCapsule',
        'Restore', 'SaveCapsule', 'Snapshot'],
    'capsule_ros.action': ['Generate'],
}
# Layers import one way: ros -> runtime (models/ inside it). Below 'ros', nothing may reach
# ROS 2 (the runtime is pip-installable without it).
ROS_MODULES = ('rclpy', 'capsule_ros.ros', 'capsule_ros.msg', 'capsule_ros.srv',
               'capsule_ros.action')


def all_module_names():
    """Return the names of every module in the installed capsule_ros package."""
    return sorted(
        info.name for info in pkgutil.walk_packages([str(PACKAGE_DIR)], prefix='capsule_ros.'))


def test_installed_tree_holds_generated_and_own_code():
    """capsule_ros resolves to the install tree, where msg/ and ros/ sit side by side."""
    assert (PACKAGE_DIR / 'msg').is_dir(), f'{PACKAGE_DIR} is not the installed tree'
    assert (PACKAGE_DIR / 'ros' / 'node.py').is_file()


def test_every_interface_file_is_listed():
    """The list above names every installed .msg / .srv / .action file, no more."""
    from ament_index_python.packages import get_package_share_directory

    share = pathlib.Path(get_package_share_directory('capsule_ros'))
    for module_name, type_names in INTERFACES.items():
        kind = module_name.split('.')[1]
        installed = sorted(path.stem for path in (share / kind).glob(f'*.{kind}'))
        assert installed == sorted(type_names), kind


@pytest.mark.parametrize('module_name', sorted(INTERFACES))
def test_generated_interfaces_import(module_name):
    """Every generated message, service and action type imports from the installed tree."""
    module = importlib.import_module(module_name)
    for type_name in INTERFACES[module_name]:
        assert hasattr(module, type_name), f'{module_name}.{type_name}'


@pytest.mark.parametrize('module_name', all_module_names())
def test_every_module_imports(module_name):
    """Every installed module imports (generated, ROS layer and runtime alike)."""
    importlib.import_module(module_name)


def imported_names(path):
    """Return the module names a Python file imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def below_ros_files():
    """Return the Python files of the layers below the ROS layer (the runtime, its models)."""
    return sorted((PACKAGE_DIR / 'runtime').rglob('*.py'))


def test_runtime_never_imports_ros():
    """The runtime and its model families import neither rclpy nor the ROS layer."""
    checked = {str(path.relative_to(PACKAGE_DIR)) for path in below_ros_files()}
    assert {'runtime/engine.py', 'runtime/models/llama.py', 'runtime/models/lfm2.py',
            'runtime/models/qwen3_5.py'} <= checked, checked
    offenders = {
        str(path.relative_to(PACKAGE_DIR)): sorted(
            name for name in imported_names(path)
            if any(name == banned or name.startswith(banned + '.') for banned in ROS_MODULES))
        for path in below_ros_files()
    }
    assert not {path: names for path, names in offenders.items() if names}
