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
The installed policy node comes up on DDS and answers the installed CLI client.

The node is started the way launch/policy.launch.py starts it: the same executable from the
install tree, the installed config/policy.yaml, and (for the launch-driven variant) the
lifecycle transitions sent through the node's own lifecycle services, as launch does.
"""

import ast
import json
import os
import shutil
import signal
import subprocess

from action_msgs.msg import GoalStatus
from capsule_ros.action import Generate
from capsule_ros.ros.client import first_answer
from capsule_ros.ros.node import MUTATING_SERVICES
from capsule_ros.ros.node import OTHER_SERVICES
from capsule_ros.ros.parameters import AUTOSTART_PARAMETER
from capsule_ros.ros.parameters import PARAMETER_DEFAULTS
from capsule_ros.srv import Snapshot
from lifecycle_msgs.msg import State
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState
from lifecycle_msgs.srv import GetState
from node_process import LAUNCH_FILE
from node_process import LIB
from node_process import NodeProcess
from node_process import PARAMS_FILE
from node_process import process_environment
from node_process import run_cli
from node_process import SHARE
import pytest
import rclpy
from rclpy.action import ActionClient
from rclpy.executors import SingleThreadedExecutor
import yaml

TIMEOUT_S = 60.0  # configure loads the model (~10 s on 2 busy cores)


def wait(executor, future, what, timeout_s=TIMEOUT_S):
    """Spin ``executor`` until ``future`` is done; fail naming ``what`` on timeout."""
    executor.spin_until_future_complete(future, timeout_sec=timeout_s)
    assert future.done(), f'no answer from {what} within {timeout_s} s'
    return future.result()


class LifecycleManager:
    """
    Drives the node's lifecycle services the way launch_ros' lifecycle events do.

    The first calls of a fresh client can lose their response to Fast DDS discovery
    (ros2/rmw_fastrtps#842, see capsule_ros.ros.client): get_state is read-only and is repeated
    until it answers; a change_state whose answer is lost is judged by the state it left.
    """

    def __init__(self, executor, node):
        """Create both lifecycle clients together, so discovery announces them together."""
        self.executor = executor
        self.get_state_client = node.create_client(GetState, '/capsule/get_state')
        self.change_state_client = node.create_client(ChangeState, '/capsule/change_state')

    def current_state(self):
        """Return the node's lifecycle state id, asking again until an answer arrives."""
        client = self.get_state_client
        assert client.wait_for_service(timeout_sec=TIMEOUT_S), 'get_state never appeared'
        return first_answer(self.executor, client, GetState.Request, TIMEOUT_S,
                            '/capsule/get_state').current_state.id

    def change_state(self, transition, expected_state):
        """Send one transition; return whether the node reached ``expected_state``."""
        client = self.change_state_client
        assert client.wait_for_service(timeout_sec=TIMEOUT_S), 'change_state never appeared'
        request = ChangeState.Request()
        request.transition.id = transition
        future = client.call_async(request)
        self.executor.spin_until_future_complete(future, timeout_sec=TIMEOUT_S)
        if future.done() and not future.result().success:
            return False
        return self.current_state() == expected_state


@pytest.fixture
def launched_node(tmp_path):
    """Start the node like launch does: autostart off, transitions sent by the launcher."""
    # The launch file's own overrides (model_path, backend arguments at their defaults).
    process = NodeProcess(
        tmp_path / 'policy_node.log', '-p', f'{AUTOSTART_PARAMETER}:=false',
        '-p', "model.path:=''", '-p', 'backend.kind:=torch')
    yield process
    assert process.stop() is not None


def test_launch_style_node_serves_capsule_interfaces(ros_context, launched_node):
    """Configure + activate over lifecycle services, every interface is up; deactivate, cleanup."""
    node = rclpy.create_node('smoke_test_client', context=ros_context)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(node)
    lifecycle = LifecycleManager(executor, node)
    try:
        state = lifecycle.current_state()
        assert state == State.PRIMARY_STATE_UNCONFIGURED, launched_node.output()
        for transition, expected_state in (
                (Transition.TRANSITION_CONFIGURE, State.PRIMARY_STATE_INACTIVE),
                (Transition.TRANSITION_ACTIVATE, State.PRIMARY_STATE_ACTIVE)):
            assert lifecycle.change_state(transition, expected_state), launched_node.output()

        listed = run_cli('list', '--json', timeout_s=TIMEOUT_S)
        assert listed.returncode == 0, listed.stderr
        answer = json.loads(listed.stdout)
        assert answer['capsules'] == []
        assert answer['sessions'] == []
        assert answer['budget_bytes'] == PARAMETER_DEFAULTS['capsules']['budget_bytes']

        snapshot = node.create_client(Snapshot, '/capsule/snapshot')
        assert snapshot.wait_for_service(timeout_sec=TIMEOUT_S)
        response = wait(executor, snapshot.call_async(
            Snapshot.Request(session_id='s0', label='briefing')), '/capsule/snapshot')
        assert not response.success
        assert response.error_code == Snapshot.Response.UNKNOWN_SESSION

        services = dict(node.get_service_names_and_types())
        for name in [*MUTATING_SERVICES, *OTHER_SERVICES]:
            assert f'/capsule/{name}' in services, name
        topics = dict(node.get_topic_names_and_types())
        assert topics.get('/capsule/events') == ['capsule_ros/msg/CapsuleEvent']
        assert topics.get('/diagnostics') == ['diagnostic_msgs/msg/DiagnosticArray']

        generate = ActionClient(node, Generate, '/capsule/generate')
        assert generate.wait_for_server(timeout_sec=TIMEOUT_S)
        goal = Generate.Goal(prompt='hello', max_new_tokens=2)
        goal_handle = wait(executor, generate.send_goal_async(goal), 'generate goal')
        wrapped = wait(executor, goal_handle.get_result_async(), 'generate result')
        assert wrapped.status == GoalStatus.STATUS_SUCCEEDED, wrapped.result.message
        assert wrapped.result.generated_tokens == len(wrapped.result.token_ids) >= 1
        generate.destroy()

        assert lifecycle.change_state(
            Transition.TRANSITION_DEACTIVATE, State.PRIMARY_STATE_INACTIVE)
        closed = run_cli('list', timeout_s=2.0)
        assert closed.returncode == 3, closed.stdout  # services are closed while inactive
        assert lifecycle.change_state(
            Transition.TRANSITION_CLEANUP, State.PRIMARY_STATE_UNCONFIGURED)
    finally:
        executor.shutdown(timeout_sec=5.0)
        node.destroy_node()


def test_autostarted_node_answers_cli_list(tmp_path):
    """Started bare (ros2 run / make demo), the node activates itself; the CLI lists nothing."""
    process = NodeProcess(tmp_path / 'policy_node.log')
    try:
        listed = run_cli('list', timeout_s=TIMEOUT_S)
        assert listed.returncode == 0, listed.stderr + process.output()
        assert listed.stdout.startswith('0 capsule(s), 0 session(s)'), listed.stdout
    finally:
        process.stop()
    output = process.output()
    assert 'active: services and action open' in output, output


def test_invalid_parameter_fails_configure_naming_it(tmp_path):
    """An out-of-range value fails configure; with autostart the process exits non-zero."""
    process = NodeProcess(
        tmp_path / 'policy_node.log', '-p', 'engine.max_seq_len:=5', '-p', 'generation.top_p:=1')
    try:
        assert process.process.wait(timeout=TIMEOUT_S) == 1, process.output()
    finally:
        process.stop()
    output = process.output()
    assert 'parameter engine.max_seq_len' in output, output


def test_cli_reports_missing_node():
    """Without a node the CLI gives up after its timeout with exit status 3."""
    listed = run_cli('--node', '/no_such_node', 'list', timeout_s=1.0)
    assert listed.returncode == 3
    assert 'no answer from /no_such_node/list' in listed.stderr


def launch_calls():
    """Return the ast.Call nodes of the installed launch file, by callee name."""
    tree = ast.parse(LAUNCH_FILE.read_text(), filename=str(LAUNCH_FILE))
    calls = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            calls.setdefault(node.func.id, []).append(node)
    return calls


def keyword(call_node, name):
    """Return the literal value of keyword ``name`` of a call, or None."""
    for item in call_node.keywords:
        if item.arg == name and isinstance(item.value, ast.Constant):
            return item.value.value
    return None


def test_launch_file_references_installed_files():
    """Every package, executable, file and launch argument the launch file names exists."""
    calls = launch_calls()
    (lifecycle_node,) = calls['LifecycleNode']
    assert keyword(lifecycle_node, 'package') == 'capsule_ros'
    executable = LIB / keyword(lifecycle_node, 'executable')
    assert executable.is_file() and os.access(executable, os.X_OK), executable
    assert keyword(lifecycle_node, 'name') == 'capsule'

    for path_join in calls['PathJoinSubstitution']:
        (parts,) = path_join.args
        first, *rest = parts.elts
        assert isinstance(first, ast.Call) and first.func.id == 'FindPackageShare'
        assert first.args[0].value == 'capsule_ros'
        path = SHARE.joinpath(*(part.value for part in rest))
        assert path.is_file(), path

    declared = {call_node.args[0].value for call_node in calls['DeclareLaunchArgument']}
    used = {call_node.args[0].value for call_node in calls['LaunchConfiguration']}
    assert used <= declared, used - declared
    assert {'params_file', 'namespace', 'model_path', 'backend'} <= declared

    # Parameter overrides in the launch file must be parameters the node declares.
    node_parameters = {AUTOSTART_PARAMETER} | {
        f'{group}.{name}' for group, names in PARAMETER_DEFAULTS.items() for name in names}
    for node in ast.walk(lifecycle_node):
        if isinstance(node, ast.Dict):
            overrides = {key.value for key in node.keys}
            assert overrides <= node_parameters, overrides - node_parameters


def test_params_file_matches_declared_parameters():
    """policy.yaml sets exactly the declared parameters, with the declared types."""
    parameters = yaml.safe_load(PARAMS_FILE.read_text())['/**']['ros__parameters']
    assert parameters.keys() == PARAMETER_DEFAULTS.keys()
    for group, defaults in PARAMETER_DEFAULTS.items():
        assert parameters[group].keys() == defaults.keys(), group
        for name, default in defaults.items():
            assert type(parameters[group][name]) is type(default), f'{group}.{name}'


@pytest.mark.skipif(
    shutil.which('ros2') is None, reason='ros2cli / launch_ros not installed (PyPI-only ROS)')
def test_ros2_launch_starts_an_active_node(tmp_path):
    """On a full ROS 2 install, 'ros2 launch' brings the node up active with autostart."""
    log_path = tmp_path / 'ros2_launch.log'
    with open(log_path, 'w') as log:
        process = subprocess.Popen(
            ['ros2', 'launch', 'capsule_ros', 'policy.launch.py'], env=process_environment(),
            stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            listed = run_cli('list', '--json', timeout_s=TIMEOUT_S)
            assert listed.returncode == 0, listed.stderr + log_path.read_text()
            assert json.loads(listed.stdout)['capsules'] == []
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
