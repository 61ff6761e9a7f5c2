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
Lifecycle edges over real DDS: deactivate and shut down while long work runs.

A client whose generation or ``append`` is cut short by a deactivate or a Ctrl-C (SIGINT) must
still get its answer: the goal's result (ABORTED with ``NOT_AVAILABLE`` and a reason, or
CANCELED when the client itself canceled) or the service response, within a bound. The node
stays up after a deactivate (and activates again with its sessions), exits with status 0 after
SIGINT, and logs no traceback in either case. A cancel is honoured during the prompt prefill
too, between prefill chunks, not only between generated tokens.

Long prefills come from ~7100-token raw prompts in 8192-token slots: on two busy cores they
take tens of seconds, one ``engine.prefill_chunk`` (512 tokens) a few.
"""

import signal
import threading
import time

from action_msgs.msg import GoalStatus
from capsule_ros.action import Generate
from capsule_ros.ros.client import CapsuleClient
from capsule_ros.ros.client import error_name
from capsule_ros.srv import Append
from lifecycle_msgs.msg import State
from lifecycle_msgs.msg import Transition
from lifecycle_tools import Background
from lifecycle_tools import counting_session
from lifecycle_tools import long_prompt
from lifecycle_tools import NodeControl
from node_process import NodeProcess
import pytest
import rclpy

TIMEOUT_S = 60.0
# From the deactivate / SIGINT to the client's answer: the generation stops before its next
# token, a prefill after its current chunk; then the result is sent. Seconds on a busy machine.
ANSWER_BOUND_S = 30.0
# How long a client waits for an answer before the test calls it lost.
LOST_AFTER_S = 150.0
LONG_PROMPT_ITEMS = 800  # 7090 tokens of SmolLM2's tokenizer
# Fewer prompt tokens than this in the result: the prefill stopped early (it has 7090).
PREFILL_STOPPED_BELOW = 3000
DEACTIVATE_ROUNDS = 3
PREFILL_CHUNK = 512  # engine.prefill_chunk of the test nodes
SIGINT_NAMESPACE = 'sigint_test'
LOG_ERRORS = ('Traceback', 'Failed to send', 'RCLError', 'is invalid', 'Error raised')


def node_arguments(capsule_dir, autostart):
    """Return ``-p`` overrides: 8192-token slots, 512-token prefill chunks, a temp dir."""
    overrides = {
        'autostart': str(autostart).lower(),
        'engine.max_seq_len': 8192,
        'engine.max_sessions': 3,
        'engine.prefill_chunk': PREFILL_CHUNK,
        'capsules.dir': str(capsule_dir),
    }
    arguments = []
    for name, value in overrides.items():
        arguments += ['-p', f'{name}:={value}']
    return arguments


def assert_clean_log(output):
    """Assert the node logged no traceback and no failed send."""
    for marker in LOG_ERRORS:
        assert marker not in output, f'{marker!r} in the node log:\n{output}'


def failed_with(answer, name, reason):
    """Assert a response / result failed with error ``name`` and a message naming ``reason``."""
    assert not answer.success, answer
    assert error_name(answer.error_code) == name, (error_name(answer.error_code),
                                                   answer.message)
    assert reason in answer.message, answer.message


@pytest.fixture(scope='module')
def context():
    """Yield an rclpy context for the module."""
    context = rclpy.context.Context()
    rclpy.init(context=context)
    yield context
    rclpy.try_shutdown(context=context)


class ManagedNode:
    """A node started with autostart off, its lifecycle control and a capsule client."""

    def __init__(self, process, control, client):
        """Bundle what the tests need."""
        self.process = process
        self.control = control
        self.client = client

    def activate(self):
        """Drive the node to active (from unconfigured or inactive)."""
        if self.control.state() == State.PRIMARY_STATE_UNCONFIGURED:
            assert self.control.change_state(Transition.TRANSITION_CONFIGURE), (
                self.process.output())
        assert self.control.change_state(Transition.TRANSITION_ACTIVATE), self.process.output()
        self.client.wait_until_active(TIMEOUT_S)


@pytest.fixture(scope='module')
def managed(tmp_path_factory, context):
    """One node for the deactivate tests, driven like launch drives it; stopped at the end."""
    log_path = tmp_path_factory.mktemp('logs') / 'policy_node.log'
    process = NodeProcess(
        log_path, *node_arguments(tmp_path_factory.mktemp('capsules'), autostart=False))
    control = NodeControl(context, 'lifecycle_edges_control')
    client = CapsuleClient(timeout_s=TIMEOUT_S, context=context, client_name='lifecycle_edges')
    try:
        node = ManagedNode(process, control, client)
        node.activate()
        yield node
    finally:
        client.close()
        control.close()
        assert process.stop() == 0, process.output()
    assert_clean_log(process.output())


def wait_for_new_session(client, sessions_before, background, what):
    """Wait until the work in ``background`` (an append or a goal) has opened its session."""
    deadline = time.monotonic() + TIMEOUT_S
    while set(client.list_capsules().sessions) == sessions_before:
        assert time.monotonic() < deadline, f'the {what} never opened its session'
        assert not background.done.is_set(), background.error or background.outcome
        time.sleep(0.1)


def test_deactivate_during_a_generation_sends_its_result(managed, context):
    """
    The generating client gets ABORTED (NOT_AVAILABLE, a reason); the node reactivates.

    Several rounds: the result is sent by an rclpy task after the goal's execution ends, so a
    server destroyed too early loses it only sometimes (most rounds on a busy machine).
    """
    for round_index in range(DEACTIVATE_ROUNDS):
        session_id = counting_session(managed.client)

        def work(client, started):
            return client.generate(session_id=session_id, max_new_tokens=1500,
                                   on_feedback=lambda message: started.set(),
                                   result_timeout_s=LOST_AFTER_S)

        generation = Background(context, f'deactivated_generation_{round_index}', work,
                                timeout_s=TIMEOUT_S)
        assert generation.started.wait(timeout=TIMEOUT_S), 'the generation never streamed'
        requested = time.monotonic()
        assert managed.control.change_state(Transition.TRANSITION_DEACTIVATE), (
            managed.process.output())
        status, result = generation.join(LOST_AFTER_S)
        assert generation.finished_at - requested < ANSWER_BOUND_S
        assert status == GoalStatus.STATUS_ABORTED, (status, result and result.message)
        failed_with(result, 'NOT_AVAILABLE', 'deactivat')
        assert result.generated_tokens >= 1
        assert len(result.token_ids) == result.generated_tokens
        assert managed.control.state() == State.PRIMARY_STATE_INACTIVE

        managed.activate()  # the engine and its sessions survived the deactivate
        assert session_id in managed.client.list_capsules().sessions
        status, more = managed.client.generate(session_id=session_id, max_new_tokens=2)
        assert status == GoalStatus.STATUS_SUCCEEDED, more.message
        assert managed.client.close_session(session_id).success
    assert_clean_log(managed.process.output())


def test_deactivate_during_a_long_append_answers_it(managed, context):
    """The appending client gets NOT_AVAILABLE within a bound; the slot it opened is freed."""
    sessions_before = set(managed.client.list_capsules().sessions)

    def work(client, started):
        return client.append(long_prompt(LONG_PROMPT_ITEMS), role=Append.Request.ROLE_RAW)

    append = Background(context, 'deactivated_append', work, timeout_s=LOST_AFTER_S)
    wait_for_new_session(managed.client, sessions_before, append, 'append')
    requested = time.monotonic()
    assert managed.control.change_state(Transition.TRANSITION_DEACTIVATE), (
        managed.process.output())
    response = append.join(LOST_AFTER_S)
    assert append.finished_at - requested < ANSWER_BOUND_S
    failed_with(response, 'NOT_AVAILABLE', 'deactivat')
    assert managed.process.process.poll() is None, managed.process.output()

    managed.activate()
    assert set(managed.client.list_capsules().sessions) == sessions_before
    assert_clean_log(managed.process.output())


def test_deactivate_during_a_goal_prefill_sends_its_result(managed, context):
    """A goal still prefilling its long prompt is stopped between chunks and answered."""
    if managed.control.state() != State.PRIMARY_STATE_ACTIVE:
        managed.activate()
    sessions_before = set(managed.client.list_capsules().sessions)

    def work(client, started):
        return client.generate(prompt=long_prompt(LONG_PROMPT_ITEMS),
                               role=Generate.Goal.ROLE_RAW, max_new_tokens=4,
                               result_timeout_s=LOST_AFTER_S)

    generation = Background(context, 'deactivated_prefill', work, timeout_s=TIMEOUT_S)
    wait_for_new_session(managed.client, sessions_before, generation, 'goal')
    requested = time.monotonic()
    assert managed.control.change_state(Transition.TRANSITION_DEACTIVATE), (
        managed.process.output())
    status, result = generation.join(LOST_AFTER_S)
    assert generation.finished_at - requested < ANSWER_BOUND_S
    assert status == GoalStatus.STATUS_ABORTED, (status, result and result.message)
    failed_with(result, 'NOT_AVAILABLE', 'deactivat')
    assert result.generated_tokens == 0
    assert result.prompt_tokens < PREFILL_STOPPED_BELOW, result.prompt_tokens

    managed.activate()
    assert set(managed.client.list_capsules().sessions) == sessions_before
    assert_clean_log(managed.process.output())


def test_cancel_during_the_prompt_prefill_stops_between_chunks(managed, context):
    """A goal canceled while its long prompt is prefilled stops at a chunk: CANCELED, no tokens."""
    if managed.control.state() != State.PRIMARY_STATE_ACTIVE:
        managed.activate()
    sessions_before = set(managed.client.list_capsules().sessions)
    cancel = threading.Event()

    def work(client, started):
        return client.generate(
            prompt=long_prompt(LONG_PROMPT_ITEMS), role=Generate.Goal.ROLE_RAW,
            max_new_tokens=4, cancel=cancel, result_timeout_s=LOST_AFTER_S)

    generation = Background(context, 'canceled_prefill', work, timeout_s=TIMEOUT_S)
    wait_for_new_session(managed.client, sessions_before, generation, 'goal')
    canceled_at = time.monotonic()
    cancel.set()  # the client sends the cancel request while the prompt is prefilled
    status, result = generation.join(LOST_AFTER_S)
    assert generation.finished_at - canceled_at < ANSWER_BOUND_S
    assert status == GoalStatus.STATUS_CANCELED, (status, result and result.message)
    assert result.stop_reason == Generate.Result.STOP_CANCELED
    assert result.generated_tokens == 0
    assert result.prompt_tokens < PREFILL_STOPPED_BELOW, result.prompt_tokens
    assert result.prompt_tokens % PREFILL_CHUNK == 0, result.prompt_tokens  # at a chunk end
    assert 'prefill' in result.message, result.message
    # The goal opened its session and generated nothing: the session is closed again.
    assert set(managed.client.list_capsules().sessions) == sessions_before
    assert_clean_log(managed.process.output())


def sigint_during(tmp_path, context, name, work, wait_started):
    """Start a bare node, run ``work`` in the background, SIGINT the node; return the answer."""
    # In its own namespace: the module's managed node (/capsule) still runs meanwhile.
    process = NodeProcess(tmp_path / f'{name}.log', '-r', f'__ns:=/{SIGINT_NAMESPACE}',
                          *node_arguments(tmp_path / 'capsules', autostart=True))
    node_name = f'/{SIGINT_NAMESPACE}/capsule'
    client = CapsuleClient(node_name, timeout_s=TIMEOUT_S, context=context, client_name=name)
    try:
        process.wait_until_active(client)
        background = Background(context, f'{name}_work', lambda worker, started: work(
            client, worker, started), timeout_s=LOST_AFTER_S, node_name=node_name)
        wait_started(client, background)
        signalled = time.monotonic()
        process.process.send_signal(signal.SIGINT)
        try:
            answer = background.join(LOST_AFTER_S)
        except AssertionError as error:
            raise AssertionError(f'{error}; node log:\n{process.output()}') from None
        assert background.finished_at - signalled < ANSWER_BOUND_S
        assert process.process.wait(timeout=TIMEOUT_S) == 0, process.output()
    finally:
        client.close()
        process.stop()
    assert_clean_log(process.output())
    return answer


def test_sigint_during_a_generation_sends_its_result(tmp_path, context):
    """Ctrl-C while generating: the client gets ABORTED with a reason, the node exits 0."""
    def work(client, worker, started):
        session_id = counting_session(worker)
        return worker.generate(session_id=session_id, max_new_tokens=1500,
                               on_feedback=lambda message: started.set(),
                               result_timeout_s=LOST_AFTER_S)

    def wait_started(client, background):
        assert background.started.wait(timeout=TIMEOUT_S), 'no token streamed'
        assert not background.done.is_set(), background.error or background.outcome

    status, result = sigint_during(tmp_path, context, 'sigint_generation', work, wait_started)
    assert status == GoalStatus.STATUS_ABORTED, (status, result and result.message)
    failed_with(result, 'NOT_AVAILABLE', 'shut')
    assert result.generated_tokens >= 1


def test_sigint_during_a_long_append_answers_it(tmp_path, context):
    """Ctrl-C while a long append prefills: the client gets NOT_AVAILABLE, the node exits 0."""
    def work(client, worker, started):
        return worker.append(long_prompt(LONG_PROMPT_ITEMS), role=Append.Request.ROLE_RAW)

    def wait_started(client, background):
        wait_for_new_session(client, set(), background, 'append')

    response = sigint_during(tmp_path, context, 'sigint_append', work, wait_started)
    failed_with(response, 'NOT_AVAILABLE', 'shut')
