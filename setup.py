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
"""
pip installation of the pure-Python runtime, for users without ROS 2.

``pip install -e .`` installs ``capsule_ros`` and ``capsule_ros.runtime`` (and backends) only.
The ROS 2 package itself (interfaces, node, CLI) is built by colcon from package.xml and
CMakeLists.txt (build type ament_cmake); colcon does not use this file.
"""

import pathlib

from setuptools import find_packages
from setuptools import setup

HERE = pathlib.Path(__file__).resolve().parent


def read_requirements():
    """Return the requirement lines of requirements.txt, without comments."""
    lines = (HERE / 'requirements.txt').read_text().splitlines()
    return [line.split('#')[0].strip() for line in lines if line.split('#')[0].strip()]


setup(
    name='capsule_ros',
    version='0.1.0',
    description='Execution-state capsules (snapshot / restore / branch) for a policy LLM',
    long_description=(HERE / 'README.md').read_text(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    maintainer='capsule_ros maintainers',
    maintainer_email='capsule-ros@robotics-dev.org',
    python_requires='>=3.10',
    # capsule_ros.ros needs the rosidl-generated modules, which only a colcon build makes.
    packages=find_packages(
        include=['capsule_ros', 'capsule_ros.runtime', 'capsule_ros.runtime.*',
                 'capsule_ros.backends', 'capsule_ros.backends.*']),
    install_requires=read_requirements(),
    extras_require={
        'test': ['pytest', 'hypothesis'],
        'bench': ['matplotlib', 'llama-cpp-python'],
    },
    zip_safe=False,
)
