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
What an operator does to the node besides the capsule interfaces, for the DDS tests.

``NodeControl`` drives /capsule's lifecycle services (as ``ros2 lifecycle set`` and launch do),
its parameter services (as ``ros2 param set/get/describe`` do) and listens to /diagnostics.
All its endpoints are created at once, and the first call is a read-only one repeated until it
answers (Fast DDS may drop the answer to a fresh client's first request: ros2/rmw_fastrtps#842,
see capsule_ros.ros.client).
"""

import threading
import time

from capsule_ros.ros.client import CapsuleClient
from capsule_ros.ros.client import first_answer
from capsule_ros.srv import Append
from diagnostic_msgs.msg import DiagnosticArray
from lifecycle_msgs.srv import ChangeState
from lifecycle_msgs.srv import GetState
from rcl_interfaces.srv import DescribeParameters
from rcl_interfaces.srv import GetParameters
from rcl_interfaces.srv import SetParameters
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.parameter import Parameter
from rclpy.parameter import parameter_value_to_python

TIMEOUT_S = 60.0  # configure loads the model (~10 s on 2 busy cores)
COUNTING_PROMPT = 'Count from 1 to 1000, one number per line.'


class NodeControl:
    """Lifecycle, parameter and diagnostics access to one policy node (default /capsule)."""

    def __init__(self, context, name, node_name='/capsule'):
        """Create the client node and every endpoint at once."""
        self.node = rclpy.create_node(name, context=context)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self.diagnostics = []
        self._lock = threading.Lock()
        self.node.create_subscription(
            DiagnosticArray, '/diagnostics', self._on_diagnostics, 10)
        self._clients = {
            'change_state': self.node.create_client(ChangeState, f'{node_name}/change_state'),
            'set_parameters': self.node.create_client(
                SetParameters, f'{node_name}/set_parameters'),
            'describe_parameters': self.node.create_client(
                DescribeParameters, f'{node_name}/describe_parameters'),
            'get_parameters': self.node.create_client(
                GetParameters, f'{node_name}/get_parameters'),
            'get_state': self.node.create_client(GetState, f'{node_name}/get_state'),
        }
        self._node_name = node_name
        self._connected = False

    def close(self):
        """Destroy the client node."""
        self.executor.shutdown(timeout_sec=5.0)
        self.node.destroy_node()

    def _client(self, service):
        client = self._clients[service]
        assert client.wait_for_service(timeout_sec=TIMEOUT_S), f'{service} never appeared'
        return client

    def _connect(self):
        if not self._connected:
            self.state()
            first_answer(self.executor, self._client('get_parameters'),
                         lambda: GetParameters.Request(names=['autostart']), TIMEOUT_S,
                         f'{self._node_name}/get_parameters')
            self._connected = True

    def _call(self, service, request, timeout_s=TIMEOUT_S):
        self._connect()
        future = self._client(service).call_async(request)
        self.executor.spin_until_future_complete(future, timeout_sec=timeout_s)
        assert future.done(), f'no answer from {self._node_name}/{service} within {timeout_s} s'
        return future.result()

    def state(self):
        """Return the lifecycle state id (asked again until an answer arrives)."""
        return first_answer(self.executor, self._client('get_state'), GetState.Request,
                            TIMEOUT_S, f'{self._node_name}/get_state').current_state.id

    def change_state(self, transition, timeout_s=TIMEOUT_S):
        """Send one transition; return ChangeState's ``success``."""
        request = ChangeState.Request()
        request.transition.id = transition
        return self._call('change_state', request, timeout_s).success

    def set_parameter(self, name, value):
        """Set one parameter; return the SetParametersResult (successful, reason)."""
        message = Parameter(name, value=value).to_parameter_msg()
        (result,) = self._call('set_parameters',
                               SetParameters.Request(parameters=[message])).results
        return result

    def get_parameter(self, name):
        """Return the current value of one parameter (a Python value)."""
        (value,) = self._call('get_parameters', GetParameters.Request(names=[name])).values
        return parameter_value_to_python(value)

    def describe_parameter(self, name):
        """Return the ParameterDescriptor of one parameter."""
        (descriptor,) = self._call(
            'describe_parameters', DescribeParameters.Request(names=[name])).descriptors
        return descriptor

    def _on_diagnostics(self, message):
        with self._lock:
            self.diagnostics.append(message)

    def wait_for_diagnostics(self, predicate, timeout_s=TIMEOUT_S):
        """Spin until a /diagnostics status of this node satisfies ``predicate``; return it."""
        deadline = time.monotonic() + timeout_s
        seen = []
        while time.monotonic() < deadline:
            self.executor.spin_once(timeout_sec=0.1)
            with self._lock:
                arrived, self.diagnostics = self.diagnostics, []
            for array in arrived:
                for status in array.status:
                    if status.name.startswith(f'{self._node_name}:'):
                        seen.append(status)
                        if predicate(status):
                            return status
        raise AssertionError(
            f'no matching /diagnostics status within {timeout_s} s; last seen: '
            f'{[(s.level, s.message) for s in seen[-3:]]}')


def diagnostic_values(status):
    """Return a DiagnosticStatus's key/value pairs as a dict."""
    return {item.key: item.value for item in status.values}


def counting_session(client):
    """
    Open a session whose assistant reply is in the middle of counting.

    Greedy decoding then goes on counting for hundreds of tokens instead of ending its turn,
    so a generation stays busy as long as a test needs (the same trick as test_node_services).
    """
    appended = client.append(COUNTING_PROMPT)
    assert appended.success, appended.message
    session_id = appended.session_id
    status, result = client.generate(session_id=session_id, max_new_tokens=1)
    assert result is not None and result.success, result and result.message
    raw = client.append(''.join(f'\n{number}' for number in range(2, 40)) + '\n',
                        session_id=session_id, role=Append.Request.ROLE_RAW)
    assert raw.success, raw.message
    return session_id


def long_prompt(num_items):
    """Return a raw prompt of about 6 tokens per item ('waypoint 17 is clear;')."""
    return ' '.join(f'waypoint {index} is clear;' for index in range(num_items))


class Background:
    """Run ``work(client)`` with its own CapsuleClient in a thread; keep what it returned."""

    def __init__(self, context, name, work, timeout_s=TIMEOUT_S, node_name='/capsule'):
        """Start the thread at once."""
        self.started = threading.Event()  # set by work (e.g. at the first feedback)
        self.done = threading.Event()
        self.outcome = None
        self.error = None
        self.finished_at = None
        self._thread = threading.Thread(
            target=self._run, args=(context, name, work, timeout_s, node_name), daemon=True)
        self._thread.start()

    def _run(self, context, name, work, timeout_s, node_name):
        client = CapsuleClient(node_name, timeout_s=timeout_s, context=context,
                               client_name=name)
        try:
            self.outcome = work(client, self.started)
        except Exception as error:  # reported by the test through join()
            self.error = error
        finally:
            self.finished_at = time.monotonic()
            client.close()
            self.started.set()
            self.done.set()

    def join(self, timeout_s):
        """Wait for the work to end; return its outcome or fail naming what went wrong."""
        assert self.done.wait(timeout=timeout_s), f'no outcome within {timeout_s} s'
        if self.error is not None:
            raise AssertionError(f'{type(self.error).__name__}: {self.error}')
        return self.outcome
