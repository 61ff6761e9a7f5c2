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
Synchronous rclpy client of a policy node, shared by ``capsule_ctl``, the demo and the tests.

One ``CapsuleClient`` owns one rclpy node and one single-threaded executor; use one per thread.
Every wait has a timeout: a call that gets no answer raises ``NoAnswerError``.

First contact and lost responses: with Fast DDS a service drops its response when its response
writer has not yet matched the client's reader; it waits 100 ms, then warns "failed to send
response (timeout): client will not receive response" (ros2/rmw_fastrtps#842). A client process
that just started, talking to a node on a busy machine, can hit this on its first call, which
then never gets an answer. ``CapsuleClient`` therefore creates all its endpoints at once and,
before its first request, repeats the read-only ``list`` call until one answer comes back: from
then on the node has discovered this client, and a snapshot or a generate goal is sent once.
"""

import threading
import time
import uuid

from action_msgs.msg import GoalStatus
from capsule_ros.action import Generate
from capsule_ros.srv import Append
from capsule_ros.srv import Branch
from capsule_ros.srv import CloseSession
from capsule_ros.srv import ListCapsules
from capsule_ros.srv import LoadCapsule
from capsule_ros.srv import ReleaseCapsule
from capsule_ros.srv import Restore
from capsule_ros.srv import SaveCapsule
from capsule_ros.srv import Snapshot
import rclpy
from rclpy.action import ActionClient
from rclpy.executors import SingleThreadedExecutor

SERVICE_TYPES = {
    'snapshot': Snapshot,
    'restore': Restore,
    'branch': Branch,
    'list': ListCapsules,
    'release': ReleaseCapsule,
    'save': SaveCapsule,
    'load': LoadCapsule,
    'close_session': CloseSession,
    'append': Append,
}

# Every response type carries the same error constants; name them by value for messages.
ERROR_NAMES = {
    getattr(Snapshot.Response, name): name for name in (
        'OK', 'UNKNOWN_CAPSULE', 'UNKNOWN_SESSION', 'FINGERPRINT_MISMATCH', 'BUDGET_EXCEEDED',
        'INVALID_ARGUMENT', 'BUSY', 'IO_ERROR', 'INTERNAL', 'NOT_AVAILABLE', 'CORRUPT_FILE')}
STOP_REASON_NAMES = {
    Generate.Result.STOP_EOS: 'eos',
    Generate.Result.STOP_STRING: 'stop_string',
    Generate.Result.STOP_MAX_TOKENS: 'max_tokens',
    Generate.Result.STOP_CANCELED: 'canceled',
    Generate.Result.STOP_ERROR: 'error',
    Generate.Result.STOP_CONTEXT_FULL: 'context_full',
}
# Generation results can take minutes (long prefill, many tokens).
DEFAULT_RESULT_TIMEOUT_S = 600.0
SPIN_STEP_S = 0.05
# First contact repeats the read-only list call, waiting this long for the first answer, then
# twice as long each time up to the cap, until one answer arrives (see CapsuleClient.connect).
FIRST_ATTEMPT_S = 0.5
LONGEST_ATTEMPT_S = 4.0


class NoAnswerError(RuntimeError):
    """The node did not answer (or did not appear) within the timeout."""


def first_answer(executor, client, make_request, timeout_s, what):
    """
    Repeat a read-only call until one answer arrives; return it (see the module docstring).

    Attempts wait 0.5, 1, 2, 4, 4, ... s; every attempt stays open, so a slow answer to an
    early one counts too. Only for requests that may safely be sent more than once.
    """
    deadline = time.monotonic() + timeout_s
    attempt_s = FIRST_ATTEMPT_S
    attempts = []
    try:
        while True:
            answered = [future for future in attempts if future.done()]
            if answered:
                return answered[0].result()
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise NoAnswerError(
                    f'no answer from {what} within {timeout_s} s (the service is there but '
                    f'did not answer: is the node busy or overloaded?)')
            attempts.append(client.call_async(make_request()))
            attempt_deadline = time.monotonic() + min(attempt_s, remaining_s)
            while (time.monotonic() < attempt_deadline
                   and not any(future.done() for future in attempts)):
                executor.spin_once(timeout_sec=SPIN_STEP_S)
            attempt_s = min(2 * attempt_s, LONGEST_ATTEMPT_S)
    finally:
        for future in attempts:
            if not future.done():
                client.remove_pending_request(future)


class CapsuleClient:
    """Calls the services and the generate action of one policy node, synchronously."""

    def __init__(self, node_name='/capsule', timeout_s=10.0, context=None,
                 client_name='capsule_client'):
        """Create the client node (no traffic until the first call)."""
        self.node_name = node_name.rstrip('/') or '/capsule'
        self.timeout_s = timeout_s
        self._node = rclpy.create_node(
            f'{client_name}_{uuid.uuid4().hex[:8]}', context=context)
        self._executor = SingleThreadedExecutor(context=context)
        self._executor.add_node(self._node)
        # Every endpoint now, so that discovery announces them together, and ``list`` last:
        # its first answer (see connect()) then follows the discovery of all the others.
        self._generate_client = ActionClient(
            self._node, Generate, f'{self.node_name}/generate')
        self._clients = {
            service: self._node.create_client(service_type, f'{self.node_name}/{service}')
            for service, service_type in sorted(
                SERVICE_TYPES.items(), key=lambda item: item[0] == 'list')}
        self._ready = set()
        self._connected = False

    @property
    def node(self):
        """Return the client's rclpy node, e.g. to subscribe to the events topic."""
        return self._node

    def spin_once(self, timeout_s=SPIN_STEP_S):
        """Process pending callbacks of the client node (subscriptions) once."""
        self._executor.spin_once(timeout_sec=timeout_s)

    def close(self):
        """Destroy the client node and its executor."""
        self._generate_client.destroy()
        self._executor.shutdown(timeout_sec=1.0)
        self._node.destroy_node()

    def __enter__(self):
        """Use as a context manager."""
        return self

    def __exit__(self, *exc_info):
        """Close on exit."""
        self.close()
        return False

    def _wait(self, future, what, timeout_s):
        self._executor.spin_until_future_complete(future, timeout_sec=timeout_s)
        if not future.done():
            raise NoAnswerError(f'no answer from {what} within {timeout_s} s')
        return future.result()

    def _wait_for_service(self, service):
        if service in self._ready:
            return
        if not self._clients[service].wait_for_service(timeout_sec=self.timeout_s):
            raise NoAnswerError(
                f'no answer from {self.node_name}/{service} within {self.timeout_s} s (is '
                f'policy_node running and active, with the same ROS_DOMAIN_ID?)')
        self._ready.add(service)

    def connect(self):
        """
        Make first contact: repeat the read-only ``list`` call until the node answers once.

        Called by the first request. Only a read-only call may be repeated; once it answered,
        the node has matched this client's endpoints, so no response is lost to discovery.
        """
        if self._connected:
            return
        self._wait_for_service('list')
        first_answer(self._executor, self._clients['list'], ListCapsules.Request,
                     self.timeout_s, f'{self.node_name}/list')
        self._connected = True

    def wait_until_active(self, timeout_s, is_alive=None):
        """
        Poll ``list`` until the node answers with success (its model may still be loading).

        Returns that response. Raises ``NoAnswerError`` after ``timeout_s``, or as soon as
        ``is_alive()`` (e.g. "the node process still runs") returns False.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if is_alive is not None and not is_alive():
                break
            try:
                response = self.list_capsules()
            except NoAnswerError:
                continue
            if response.success:
                return response
            time.sleep(0.5)
        raise NoAnswerError(f'{self.node_name} did not become active within {timeout_s} s')

    def call(self, service, request=None, **fields):
        """Call ``service`` (e.g. ``'snapshot'``) with a request or request fields."""
        service_type = SERVICE_TYPES[service]
        if request is None:
            request = service_type.Request(**fields)
        self.connect()
        self._wait_for_service(service)
        name = f'{self.node_name}/{service}'
        return self._wait(self._clients[service].call_async(request), name, self.timeout_s)

    def snapshot(self, session_id, label='', pin=False):
        """Call ``snapshot``."""
        return self.call('snapshot', session_id=session_id, label=label, pin=pin)

    def restore(self, capsule_id, session_id=''):
        """Call ``restore``."""
        return self.call('restore', capsule_id=capsule_id, session_id=session_id)

    def branch(self, capsule_id, num_branches):
        """Call ``branch``."""
        return self.call('branch', capsule_id=capsule_id, num_branches=num_branches)

    def list_capsules(self, session_id=''):
        """Call ``list``."""
        return self.call('list', session_id=session_id)

    def release(self, capsule_id):
        """Call ``release``."""
        return self.call('release', capsule_id=capsule_id)

    def save(self, capsule_id, name=''):
        """Call ``save``."""
        return self.call('save', capsule_id=capsule_id, name=name)

    def load(self, name):
        """Call ``load``."""
        return self.call('load', name=name)

    def close_session(self, session_id):
        """Call ``close_session``."""
        return self.call('close_session', session_id=session_id)

    def append(self, prompt, session_id='', role=Append.Request.ROLE_USER):
        """Call ``append``."""
        return self.call('append', session_id=session_id, prompt=prompt, role=role)

    def generate(self, goal=None, on_feedback=None, cancel=None,
                 result_timeout_s=DEFAULT_RESULT_TIMEOUT_S, **fields):
        """
        Run one Generate goal to its end; return ``(status, result)``.

        ``goal`` is a ``Generate.Goal`` (or give its fields as keywords). ``on_feedback`` gets
        every feedback message. Setting the ``cancel`` event (a ``threading.Event``) cancels
        the goal; the result then tells how far it got. ``status`` is the ``GoalStatus``
        value (``STATUS_REJECTED`` when the node refused the goal, with ``result`` None).
        """
        goal = goal if goal is not None else Generate.Goal(**fields)
        cancel = cancel if cancel is not None else threading.Event()
        name = f'{self.node_name}/generate'
        self.connect()
        if not self._generate_client.wait_for_server(timeout_sec=self.timeout_s):
            raise NoAnswerError(f'no action server {name} within {self.timeout_s} s')

        def feedback_callback(message):
            if on_feedback is not None:
                on_feedback(message.feedback)

        goal_handle = self._wait(
            self._generate_client.send_goal_async(goal, feedback_callback=feedback_callback),
            f'{name} (goal)', self.timeout_s)
        if not goal_handle.accepted:
            return GoalStatus.STATUS_REJECTED, None
        result_future = goal_handle.get_result_async()
        deadline = time.monotonic() + result_timeout_s
        cancel_sent = False
        while not result_future.done():
            if time.monotonic() > deadline:
                goal_handle.cancel_goal_async()
                raise NoAnswerError(f'no result from {name} within {result_timeout_s} s')
            if cancel.is_set() and not cancel_sent:
                goal_handle.cancel_goal_async()
                cancel_sent = True
            self._executor.spin_once(timeout_sec=SPIN_STEP_S)
        wrapped = result_future.result()
        return wrapped.status, wrapped.result


def error_name(code):
    """Return the name of an ``error_code`` value (e.g. ``'BUSY'``)."""
    return ERROR_NAMES.get(code, str(code))
