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
Every generated message, service and action type round-trips over real Fast DDS.

Two rclpy nodes in this process talk through the middleware (no intra-process shortcut):
each message is published with a non-default value in every field and compared on receipt;
each service has a real server that checks the request and answers with a filled response;
the action exchanges goal, feedback and result between a real ActionServer and ActionClient.
"""

import array
import importlib
import threading
import time

from action_msgs.msg import GoalStatus
from capsule_ros import action as capsule_action
from capsule_ros import msg as capsule_msg
from capsule_ros import srv as capsule_srv
import pytest
import rclpy
from rclpy.action import ActionClient
from rclpy.action import ActionServer
from rclpy.executors import MultiThreadedExecutor
from rclpy.qos import DurabilityPolicy
from rclpy.qos import QoSProfile
from rclpy.qos import ReliabilityPolicy

MESSAGE_TYPES = ['CapsuleEvent', 'CapsuleInfo', 'SamplingParams']
SERVICE_TYPES = [
    'Append', 'Branch', 'CloseSession', 'ListCapsules', 'LoadCapsule', 'ReleaseCapsule',
    'Restore', 'SaveCapsule', 'Snapshot',
]
TIMEOUT_S = 20.0

INTEGER_RANGES = {
    'octet': 255, 'uint8': 255, 'int8': 127, 'uint16': 65535, 'int16': 32767,
    'uint32': 2 ** 32 - 1, 'int32': 2 ** 31 - 1,
}


def value_for(type_name, seed):
    """Return a non-default value of ROS field type ``type_name``, distinct per ``seed``."""
    if type_name.startswith('sequence<'):
        inner = type_name[len('sequence<'):-1]
        return [value_for(inner, seed + offset) for offset in range(3)]
    if type_name == 'boolean':
        return True
    if type_name == 'string':
        return f'value-{seed}-\u00e9\u6f22'  # non-ASCII: strings are UTF-8 on the wire
    if type_name in ('float', 'double'):
        return seed + 0.5  # exact in float32
    if type_name == 'uint64':
        return 2 ** 40 + seed  # needs more than 32 bits
    if type_name == 'int64':
        return -(2 ** 40) - seed
    if type_name in INTEGER_RANGES:
        return seed % INTEGER_RANGES[type_name] + 1
    package, name = type_name.split('/')
    return filled(getattr(importlib.import_module(f'{package}.msg'), name), seed * 10)


def filled(message_type, seed=1):
    """Return an instance of ``message_type`` with a non-default value in every field."""
    message = message_type()
    field_types = message_type.get_fields_and_field_types()
    for index, (name, type_name) in enumerate(sorted(field_types.items())):
        setattr(message, name, value_for(type_name, seed + index))
    return message


def as_plain(value):
    """Turn arrays into lists so field values compare and print plainly."""
    return list(value) if isinstance(value, (array.array, list)) else value


def assert_same_fields(received, sent):
    """Assert that every field of ``received`` equals the one of ``sent``."""
    for name in type(sent).get_fields_and_field_types():
        assert as_plain(getattr(received, name)) == as_plain(getattr(sent, name)), name
    assert received == sent


@pytest.fixture
def two_nodes(ros_context):
    """Yield (server_node, client_node), spun by one executor in a background thread."""
    server_node = rclpy.create_node('roundtrip_server', context=ros_context)
    client_node = rclpy.create_node('roundtrip_client', context=ros_context)
    executor = MultiThreadedExecutor(context=ros_context)
    executor.add_node(server_node)
    executor.add_node(client_node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        yield server_node, client_node
    finally:
        executor.shutdown(timeout_sec=5.0)
        server_node.destroy_node()
        client_node.destroy_node()
        spinner.join(timeout=5.0)


def wait_for(event, what):
    """Wait for ``event`` or fail naming ``what``."""
    assert event.wait(TIMEOUT_S), f'timed out after {TIMEOUT_S} s waiting for {what}'


@pytest.mark.parametrize('type_name', MESSAGE_TYPES)
def test_filled_message_differs_from_default_in_every_field(type_name):
    """Guard the round trips below: the filler really sets every field."""
    message_type = getattr(capsule_msg, type_name)
    message, default = filled(message_type), message_type()
    for name in message_type.get_fields_and_field_types():
        assert as_plain(getattr(message, name)) != as_plain(getattr(default, name)), name


@pytest.mark.parametrize('type_name', MESSAGE_TYPES)
def test_message_round_trip(two_nodes, type_name):
    """Publish a filled message from one node; the other receives it unchanged."""
    server_node, client_node = two_nodes
    message_type = getattr(capsule_msg, type_name)
    sent = filled(message_type)
    qos = QoSProfile(
        depth=1, reliability=ReliabilityPolicy.RELIABLE,
        durability=DurabilityPolicy.TRANSIENT_LOCAL)
    received = []
    arrived = threading.Event()

    def on_message(message):
        received.append(message)
        arrived.set()

    topic = f'roundtrip/{type_name}'
    client_node.create_subscription(message_type, topic, on_message, qos)
    publisher = server_node.create_publisher(message_type, topic, qos)
    deadline = time.monotonic() + TIMEOUT_S
    while publisher.get_subscription_count() == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    publisher.publish(sent)
    wait_for(arrived, f'{type_name} on {topic}')
    assert_same_fields(received[0], sent)


@pytest.mark.parametrize('type_name', SERVICE_TYPES)
def test_service_round_trip(two_nodes, type_name):
    """A real server checks the filled request and answers a filled response."""
    server_node, client_node = two_nodes
    service_type = getattr(capsule_srv, type_name)
    request = filled(service_type.Request, seed=3)
    expected_response = filled(service_type.Response, seed=7)
    requests_seen = []

    def serve(received_request, response):
        requests_seen.append(received_request)
        for name in service_type.Response.get_fields_and_field_types():
            setattr(response, name, getattr(expected_response, name))
        return response

    name = f'roundtrip/{type_name.lower()}'
    server_node.create_service(service_type, name, serve)
    client = client_node.create_client(service_type, name)
    assert client.wait_for_service(timeout_sec=TIMEOUT_S), f'{name} never appeared'
    done = threading.Event()
    future = client.call_async(request)
    future.add_done_callback(lambda _: done.set())
    wait_for(done, f'the response of {name}')
    assert_same_fields(requests_seen[0], request)
    assert_same_fields(future.result(), expected_response)


def test_action_round_trip(two_nodes):
    """Goal, feedback and result of Generate cross DDS between ActionServer and client."""
    server_node, client_node = two_nodes
    goal = filled(capsule_action.Generate.Goal, seed=11)
    feedback = filled(capsule_action.Generate.Feedback, seed=13)
    result = filled(capsule_action.Generate.Result, seed=17)
    goals_seen = []

    def execute(goal_handle):
        goals_seen.append(goal_handle.request)
        goal_handle.publish_feedback(feedback)
        goal_handle.succeed()
        return result

    server = ActionServer(server_node, capsule_action.Generate, 'roundtrip/generate', execute)
    client = ActionClient(client_node, capsule_action.Generate, 'roundtrip/generate')
    try:
        assert client.wait_for_server(timeout_sec=TIMEOUT_S), 'action server never appeared'
        feedback_seen = []
        feedback_arrived = threading.Event()

        def on_feedback(feedback_message):
            feedback_seen.append(feedback_message.feedback)
            feedback_arrived.set()

        accepted = threading.Event()
        goal_future = client.send_goal_async(goal, feedback_callback=on_feedback)
        goal_future.add_done_callback(lambda _: accepted.set())
        wait_for(accepted, 'the goal response')
        goal_handle = goal_future.result()
        assert goal_handle.accepted
        finished = threading.Event()
        result_future = goal_handle.get_result_async()
        result_future.add_done_callback(lambda _: finished.set())
        wait_for(finished, 'the result')
        wait_for(feedback_arrived, 'the feedback')
        assert_same_fields(goals_seen[0], goal)
        assert_same_fields(feedback_seen[0], feedback)
        wrapped = result_future.result()
        assert wrapped.status == GoalStatus.STATUS_SUCCEEDED
        assert_same_fields(wrapped.result, result)
    finally:
        client.destroy()
        server.destroy()
