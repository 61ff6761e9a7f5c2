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
Parameters over real DDS, as ``ros2 param set/get/describe`` and ``ros2 lifecycle set`` use them.

A parameter set is applied or refused with a reason, never ignored: the parameters are applied
at configure, so while the node is configured a set is refused with the way to change it;
wrong types and out-of-range values are refused in every state; a start-up value that is
invalid fails configure, and the reason reaches the operator's side on /diagnostics (a
ChangeState answer carries no message). Reconfiguring with more session slots keeps an
executor thread free for cancel and ``list`` however many sessions generate.
"""

import threading
import time

from action_msgs.msg import GoalStatus
from capsule_ros.ros.client import CapsuleClient
from capsule_ros.ros.client import error_name
from diagnostic_msgs.msg import DiagnosticStatus
from lifecycle_msgs.msg import State
from lifecycle_msgs.msg import Transition
from lifecycle_tools import Background
from lifecycle_tools import counting_session
from lifecycle_tools import diagnostic_values
from lifecycle_tools import NodeControl
from node_process import NodeProcess

TIMEOUT_S = 60.0
# A read-only call while every session generates: answered in well under a second when a
# thread is free; a starved executor never answers it.
LIST_BOUND_S = 10.0
ANSWER_BOUND_S = 30.0  # cancel -> CANCELED result, with every session generating
GENERATIONS = 5  # engine.max_sessions after the reconfigure, and generations run at once
LOG_ERRORS = ('Traceback', 'Failed to send', 'RCLError', 'Error raised')


def arguments(**overrides):
    """Return ``-p`` arguments for ``overrides`` (dots written as double underscores)."""
    result = []
    for name, value in overrides.items():
        result += ['-p', f'{name.replace("__", ".")}:={value}']
    return result


def assert_clean_log(output):
    """Assert the node logged no traceback and no failed send."""
    for marker in LOG_ERRORS:
        assert marker not in output, f'{marker!r} in the node log:\n{output}'


def refused(result, *words):
    """Assert a SetParametersResult refused the set with a reason containing ``words``."""
    assert not result.successful, 'the set was accepted'
    for word in words:
        assert word in result.reason, result.reason
    return result


def test_parameter_sets_are_applied_or_refused_never_ignored(tmp_path, context):
    """Sets are checked for type and range, refused while configured, applied at configure."""
    process = NodeProcess(tmp_path / 'policy_node.log', *arguments(
        autostart='false', engine__max_seq_len=5, engine__max_sessions=2,
        capsules__dir=tmp_path / 'capsules'))
    control = NodeControl(context, 'parameters_control')
    try:
        assert control.state() == State.PRIMARY_STATE_UNCONFIGURED, process.output()

        # The start-up value 5 is out of range: configure fails, and says why on /diagnostics.
        assert not control.change_state(Transition.TRANSITION_CONFIGURE)
        status = control.wait_for_diagnostics(
            lambda status: status.level == DiagnosticStatus.ERROR
            and 'engine.max_seq_len' in status.message)
        values = diagnostic_values(status)
        assert values['state'] == 'unconfigured'
        assert 'engine.max_seq_len' in values['last_configure_error']
        assert control.state() == State.PRIMARY_STATE_UNCONFIGURED

        # Unconfigured: wrong types and out-of-range values are refused, valid values applied.
        for value in ('abc', 2048.0, True):
            refused(control.set_parameter('engine.max_seq_len', value))
        refused(control.set_parameter('engine.max_seq_len', 5), 'engine.max_seq_len')
        refused(control.set_parameter('engine.max_seq_len', 1 << 21), 'engine.max_seq_len')
        refused(control.set_parameter('generation.top_p', 0.0), 'generation.top_p')
        refused(control.set_parameter('generation.top_p', 1))  # an integer for a double
        refused(control.set_parameter('model.dtype', 'float16'), 'model.dtype')
        assert control.set_parameter('engine.max_seq_len', 2048).successful
        assert control.get_parameter('engine.max_seq_len') == 2048

        assert control.change_state(Transition.TRANSITION_CONFIGURE), process.output()
        status = control.wait_for_diagnostics(
            lambda status: diagnostic_values(status).get('state') == 'inactive')
        assert status.level == DiagnosticStatus.OK, status.message
        assert diagnostic_values(status)['last_configure_error'] == ''

        # Configured: every configure-time parameter is refused with the way to change it.
        for state_transition in (None, Transition.TRANSITION_ACTIVATE):
            if state_transition is not None:
                assert control.change_state(state_transition), process.output()
            for name, value in (('engine.max_seq_len', 4096), ('model.dtype', 'float32'),
                                ('generation.max_new_tokens', 64)):
                refused(control.set_parameter(name, value), name, 'applied at configure',
                        'deactivate', 'cleanup', 'configure')
            assert control.get_parameter('engine.max_seq_len') == 2048
        refused(control.set_parameter('autostart', False))  # read only: used at start-up

        max_seq_len = control.describe_parameter('engine.max_seq_len')
        assert max_seq_len.description and not max_seq_len.read_only
        (integer_range,) = max_seq_len.integer_range
        assert (integer_range.from_value, integer_range.to_value) == (16, 1 << 20)
        (top_p_range,) = control.describe_parameter('generation.top_p').floating_point_range
        assert top_p_range.to_value == 1.0
        assert 'bfloat16' in control.describe_parameter('model.dtype').additional_constraints
        assert control.describe_parameter('autostart').read_only

        # The documented way: deactivate, cleanup, set, configure.
        for transition in (Transition.TRANSITION_DEACTIVATE, Transition.TRANSITION_CLEANUP):
            assert control.change_state(transition), process.output()
        assert control.set_parameter('engine.max_seq_len', 1024).successful
        assert control.change_state(Transition.TRANSITION_CONFIGURE), process.output()
        assert control.get_parameter('engine.max_seq_len') == 1024
    finally:
        control.close()
        process.stop()
    assert_clean_log(process.output())


def test_more_sessions_after_reconfigure_leave_threads_for_cancel_and_list(tmp_path, context):
    """
    Started with 1 slot, reconfigured to 5, all 5 generating: list and cancel are answered.

    One more generation or append is refused at once with BUSY and the reason.
    """
    process = NodeProcess(tmp_path / 'policy_node.log', *arguments(
        autostart='false', engine__max_seq_len=2048, engine__max_sessions=1,
        capsules__dir=tmp_path / 'capsules'))
    control = NodeControl(context, 'threads_control')
    client = CapsuleClient(timeout_s=TIMEOUT_S, context=context, client_name='threads_test')
    generations = []
    cancel = threading.Event()
    try:
        for transition in (Transition.TRANSITION_CONFIGURE, Transition.TRANSITION_ACTIVATE,
                           Transition.TRANSITION_DEACTIVATE, Transition.TRANSITION_CLEANUP):
            assert control.change_state(transition), process.output()
        assert control.set_parameter('engine.max_sessions', GENERATIONS).successful
        for transition in (Transition.TRANSITION_CONFIGURE, Transition.TRANSITION_ACTIVATE):
            assert control.change_state(transition), process.output()
        client.wait_until_active(TIMEOUT_S)

        def work(worker, started):
            session_id = counting_session(worker)
            return worker.generate(session_id=session_id, max_new_tokens=1500, cancel=cancel,
                                   on_feedback=lambda message: started.set(),
                                   result_timeout_s=5 * TIMEOUT_S)

        generations = [Background(context, f'generation_{index}', work)
                       for index in range(GENERATIONS)]
        for generation in generations:
            assert generation.started.wait(timeout=3 * TIMEOUT_S), 'a generation never started'
            assert not generation.done.is_set(), generation.error or generation.outcome

        client.timeout_s = LIST_BOUND_S
        listed = client.list_capsules()  # NoAnswerError: a starved executor
        assert listed.success and len(listed.sessions) == GENERATIONS, listed
        client.timeout_s = TIMEOUT_S
        status, result = client.generate(prompt='One more plan, please.', max_new_tokens=2)
        assert status == GoalStatus.STATUS_ABORTED, (status, result and result.message)
        assert error_name(result.error_code) == 'BUSY', result.message
        assert f'engine.max_sessions={GENERATIONS}' in result.message, result.message
        appended = client.append('One more observation.')
        assert error_name(appended.error_code) == 'BUSY', appended.message
        assert f'engine.max_sessions={GENERATIONS}' in appended.message, appended.message

        canceled_at = time.monotonic()
        cancel.set()
        for generation in generations:
            status, result = generation.join(3 * TIMEOUT_S)
            assert generation.finished_at - canceled_at < ANSWER_BOUND_S
            assert status == GoalStatus.STATUS_CANCELED, (status, result and result.message)
    finally:
        cancel.set()
        deadline = time.monotonic() + ANSWER_BOUND_S  # a starved node never answers them
        for generation in generations:
            generation.done.wait(timeout=max(0.0, deadline - time.monotonic()))
        client.close()
        control.close()
        process.stop()
    assert_clean_log(process.output())
