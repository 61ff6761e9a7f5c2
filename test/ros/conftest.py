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
Shared set-up of the DDS integration tests: an isolated ROS 2 graph per test run.

The ROS environment is set at import, before any test calls rclpy.init() or starts a node
process, so the test nodes and the subprocesses they start share one private domain.
"""

import os

import pytest
import rclpy

# A domain per run (1..100, from the pid) so parallel runs and other ROS graphs on the machine
# never cross-talk; discovery stays on this host.
os.environ['ROS_DOMAIN_ID'] = str(1 + os.getpid() % 100)
os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
os.environ.pop('ROS_LOCALHOST_ONLY', None)  # deprecated since Jazzy; the range above rules


@pytest.fixture
def ros_context():
    """Yield an initialized rclpy context; shut it down after the test."""
    context = rclpy.context.Context()
    rclpy.init(context=context)
    try:
        yield context
    finally:
        rclpy.try_shutdown(context=context)


@pytest.fixture
def context(ros_context):
    """Yield ros_context under the name the node tests use (some override it per module)."""
    yield ros_context
