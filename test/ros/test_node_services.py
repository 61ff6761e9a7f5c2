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
Integration tests of the policy node over real DDS: every service, the action, every code.

One node per module (model load is the expensive part), started as the launch file starts
it: the installed executable, the installed config/policy.yaml, ``-p`` overrides for a light
configuration (2048-token slots, 6 sessions, a 16 MiB capsule budget, a temporary capsule
directory). Greedy decoding everywhere, so token ids can be compared exactly. Assertions are
about answers and counts, never about timings.
"""

import json
import threading

from action_msgs.msg import GoalStatus
from capsule_ros.action import Generate
from capsule_ros.msg import CapsuleEvent
from capsule_ros.msg import CapsuleInfo
from capsule_ros.msg import SamplingParams
from capsule_ros.ros.client import CapsuleClient
from capsule_ros.ros.client import error_name
from capsule_ros.ros.load_probe import run_load
from capsule_ros.srv import Append
from node_process import latest_diagnostics
from node_process import light_parameters
from node_process import NodeProcess
from node_process import run_cli
import pytest
import rclpy

TIMEOUT_S = 30.0
BUDGET_BYTES = 16 * 1024 * 1024  # ~700 bf16 tokens of SmolLM2 KV: small enough to exceed
BRIEFING = ('The robot is in a warehouse. Shelves A to F line the north wall; the charging '
            'dock is at the south-east corner. Task: bring the red toolbox from shelf C to '
            'the workbench near the door.')
UINT32_MAX = 2 ** 32 - 1


class PolicyNodeUnderTest:
    """The module's node process, a client in the test's rclpy context, and its paths."""

    def __init__(self, process, client, capsule_dir):
        """Bundle what the tests need."""
        self.process = process
        self.client = client
        self.capsule_dir = capsule_dir


@pytest.fixture(scope='module')
def context():
    """Yield an rclpy context for the whole module."""
    context = rclpy.context.Context()
    rclpy.init(context=context)
    yield context
    rclpy.try_shutdown(context=context)


@pytest.fixture(scope='module')
def node(tmp_path_factory, context):
    """Start one light policy node for the module; stop it afterwards."""
    capsule_dir = tmp_path_factory.mktemp('capsules')
    log_path = tmp_path_factory.mktemp('logs') / 'policy_node.log'
    process = NodeProcess(log_path, *light_parameters(capsule_dir, budget_bytes=BUDGET_BYTES))
    client = CapsuleClient(timeout_s=TIMEOUT_S, context=context, client_name='services_test')
    try:
        process.wait_until_active(client)
        yield PolicyNodeUnderTest(process, client, capsule_dir)
    finally:
        client.close()
        assert process.stop() is not None
    assert 'Traceback' not in process.output(), process.output()


@pytest.fixture
def client(node):
    """Yield the module's client; close the sessions a test opened when it ends."""
    before = set(node.client.list_capsules().sessions)
    yield node.client
    for session_id in set(node.client.list_capsules().sessions) - before:
        node.client.close_session(session_id)


def ok(response):
    """Assert a service response (or action result) succeeded; return it."""
    assert response.success, f'{error_name(response.error_code)}: {response.message}'
    assert response.error_code == response.OK and response.message == ''
    return response


def failed(response, name):
    """Assert a response failed with error ``name`` and a message; return it."""
    assert not response.success
    assert error_name(response.error_code) == name, (
        f'{error_name(response.error_code)}: {response.message}')
    assert response.message
    return response


def generate(client, expected_status=GoalStatus.STATUS_SUCCEEDED, **fields):
    """Run one goal; assert its status; return the result."""
    fields.setdefault('max_new_tokens', 4)
    status, result = client.generate(**fields)
    assert status == expected_status, (status, result and result.message)
    return result


def new_session(client, prompt=BRIEFING, role=Append.Request.ROLE_USER):
    """Open a session with ``prompt`` appended; return the append response."""
    return ok(client.append(prompt, role=role))


def counting_session(client):
    """
    Open a session whose assistant reply is in the middle of counting.

    The reply is opened with one generated token, then continued with raw text ("2", "3",
    ...), so greedy decoding goes on counting for hundreds of tokens instead of ending its
    turn: the generation stays busy as long as a test needs.
    """
    session_id = new_session(client, 'Count from 1 to 1000, one number per line.').session_id
    ok(generate(client, session_id=session_id, max_new_tokens=1))
    ok(client.append(''.join(f'\n{number}' for number in range(2, 40)) + '\n',
                     session_id=session_id, role=Append.Request.ROLE_RAW))
    return session_id


def test_list_reports_budget_and_empty_store(client):
    """The freshly started node answers list with the configured budget and nothing in it."""
    response = ok(client.list_capsules())
    assert response.budget_bytes == BUDGET_BYTES
    assert response.used_bytes == 0
    assert list(response.capsules) == [] and list(response.sessions) == []


def test_append_snapshot_list_release_close(client):
    """The state services do what they say, with consistent numbers."""
    appended = new_session(client)
    assert appended.session_id and appended.num_tokens > 0
    assert appended.position >= appended.num_tokens  # system prompt first
    more = ok(client.append('Also avoid aisle 3.', session_id=appended.session_id,
                            role=Append.Request.ROLE_OBSERVATION))
    assert more.position == appended.position + more.num_tokens

    snapshot = ok(client.snapshot(appended.session_id, label='briefing-1', pin=True))
    capsule = snapshot.capsule
    assert capsule.capsule_id == capsule.label == 'briefing-1'
    assert capsule.session_id == appended.session_id
    assert capsule.num_tokens == more.position
    assert capsule.pinned and capsule.resident_in_slot
    assert capsule.tier == CapsuleInfo.TIER_SLOT
    assert capsule.kv_bytes > 0 and capsule.state_bytes > 0
    assert len(capsule.model_fingerprint) == 32
    second = ok(client.snapshot(appended.session_id)).capsule
    assert second.capsule_id.startswith('cap-') and second.parent_id == 'briefing-1'

    listed = ok(client.list_capsules(appended.session_id))
    assert {info.capsule_id for info in listed.capsules} == {'briefing-1', second.capsule_id}
    assert appended.session_id in listed.sessions
    (parent,) = [info for info in listed.capsules if info.capsule_id == 'briefing-1']
    assert list(parent.children) == [second.capsule_id]
    assert ok(client.list_capsules('no-such-session')).capsules == []

    for capsule_id in (second.capsule_id, 'briefing-1'):
        ok(client.release(capsule_id))
        failed(client.release(capsule_id), 'UNKNOWN_CAPSULE')
    closed = ok(client.close_session(appended.session_id))
    assert appended.session_id not in closed.sessions
    failed(client.close_session(appended.session_id), 'UNKNOWN_SESSION')


def test_bad_input_gets_named_error_codes(client):
    """Unknown ids, empty strings, absurd counts and path tricks: one named code each."""
    session_id = new_session(client).session_id
    ok(client.snapshot(session_id, label='bad-input'))
    sessions_before = ok(client.list_capsules()).sessions

    failed(client.snapshot(''), 'INVALID_ARGUMENT')
    failed(client.snapshot('no-such-session'), 'UNKNOWN_SESSION')
    failed(client.snapshot(session_id, label='../escape'), 'INVALID_ARGUMENT')
    failed(client.snapshot(session_id, label='a/b'), 'INVALID_ARGUMENT')
    failed(client.snapshot(session_id, label='bad-input'), 'INVALID_ARGUMENT')  # id taken

    failed(client.restore(''), 'INVALID_ARGUMENT')
    failed(client.restore('no-such-capsule'), 'UNKNOWN_CAPSULE')
    failed(client.restore('bad-input', session_id='no-such-session'), 'UNKNOWN_SESSION')

    failed(client.branch('no-such-capsule', 1), 'UNKNOWN_CAPSULE')
    failed(client.branch('', 1), 'INVALID_ARGUMENT')
    failed(client.branch('bad-input', 0), 'INVALID_ARGUMENT')
    failed(client.branch('bad-input', 65), 'INVALID_ARGUMENT')
    failed(client.branch('bad-input', UINT32_MAX), 'INVALID_ARGUMENT')

    failed(client.release(''), 'INVALID_ARGUMENT')
    failed(client.release('no-such-capsule'), 'UNKNOWN_CAPSULE')

    failed(client.save('no-such-capsule'), 'UNKNOWN_CAPSULE')
    failed(client.save(''), 'INVALID_ARGUMENT')
    for name in ('..', '../outside', 'a/../b', '/etc/passwd', '.hidden'):
        failed(client.save('bad-input', name=name), 'INVALID_ARGUMENT')
        failed(client.load(name), 'INVALID_ARGUMENT')
    failed(client.load(''), 'INVALID_ARGUMENT')
    failed(client.load('never-saved'), 'UNKNOWN_CAPSULE')

    failed(client.close_session(''), 'INVALID_ARGUMENT')
    failed(client.close_session('no-such-session'), 'UNKNOWN_SESSION')

    failed(client.append(''), 'INVALID_ARGUMENT')
    failed(client.append('hello', role=9), 'INVALID_ARGUMENT')
    failed(client.append('hello', session_id='no-such-session'), 'UNKNOWN_SESSION')

    aborted = GoalStatus.STATUS_ABORTED
    for fields, name in (
            ({'session_id': session_id, 'max_new_tokens': UINT32_MAX}, 'INVALID_ARGUMENT'),
            ({'session_id': session_id, 'max_new_tokens': 100000}, 'INVALID_ARGUMENT'),
            ({'session_id': session_id, 'role': 7}, 'INVALID_ARGUMENT'),
            ({'session_id': session_id, 'sampling': SamplingParams(top_p=0.0)},
             'INVALID_ARGUMENT'),
            ({'session_id': session_id, 'sampling': SamplingParams(temperature=-1.0)},
             'INVALID_ARGUMENT'),
            ({'session_id': session_id, 'sampling': SamplingParams(
                temperature=float('nan'))}, 'INVALID_ARGUMENT'),
            ({'session_id': 'no-such-session', 'prompt': 'hi'}, 'UNKNOWN_SESSION'),
            ({'prompt': 'hi', 'max_new_tokens': 100000}, 'INVALID_ARGUMENT'),
            ({'prompt': 'hi', 'role': 9}, 'INVALID_ARGUMENT'),
            ({'session_id': session_id, 'snapshot_after': True, 'label': 'bad-input'},
             'INVALID_ARGUMENT')):
        result = generate(client, expected_status=aborted, **fields)
        failed(result, name)
        if not fields.get('snapshot_after'):
            assert result.stop_reason == Generate.Result.STOP_ERROR
            assert result.generated_tokens == 0
    # Failed goals that asked for a new session did not leak one.
    assert ok(client.list_capsules()).sessions == sessions_before
    ok(client.release('bad-input'))


def test_negative_counts_are_refused_before_the_wire(client):
    """Negative counts cannot be encoded (uint32): the client fails to send, the CLI refuses."""
    # rclpy refuses the value when it is set (AssertionError, ValueError, OverflowError) or
    # fails to serialize it on send (SystemError in Kilted's rclpy); never a client bug
    with pytest.raises((AssertionError, ValueError, OverflowError, SystemError)):
        client.branch('some-capsule', -3)
    ok(client.list_capsules())  # and the node is unaffected
    branched = run_cli('branch', 'some-capsule', '-3')
    assert branched.returncode == 2, branched.stderr
    generated = run_cli('generate', 'hi', '--max-new-tokens', '-1')
    assert generated.returncode == 2, generated.stderr


def test_budget_exceeded(client):
    """A capsule larger than capsules.budget_bytes is refused with BUDGET_EXCEEDED."""
    long_text = ' '.join(f'waypoint {index} is clear;' for index in range(200))
    appended = new_session(client, long_text, role=Append.Request.ROLE_RAW)
    assert appended.position * 23040 > BUDGET_BYTES  # bf16 KV bytes per token of SmolLM2
    failed(client.snapshot(appended.session_id, label='too-big'), 'BUDGET_EXCEEDED')
    assert 'too-big' not in [info.capsule_id for info in ok(client.list_capsules()).capsules]


def test_save_load_and_damaged_files(client, node):
    """Save writes a file, load verifies it; wrong-model, truncated and missing files fail."""
    session_id = new_session(client).session_id
    capsule = ok(client.snapshot(session_id, label='to-disk')).capsule
    saved = ok(client.save('to-disk'))
    assert saved.path == str(node.capsule_dir / 'to-disk') and saved.bytes_written > 0
    assert 'to-disk' in ok(client.list_capsules()).saved  # the disk tier is listed
    failed(client.load('to-disk'), 'INVALID_ARGUMENT')  # the id 'to-disk' is live
    ok(client.save('to-disk', name='to-disk-copy'))
    loaded = ok(client.load('to-disk-copy')).capsule
    assert loaded.capsule_id == 'to-disk-copy'
    assert loaded.num_tokens == capsule.num_tokens
    assert loaded.model_fingerprint == capsule.model_fingerprint

    ok(client.save('to-disk', name='wrong-model'))
    manifest_path = node.capsule_dir / 'wrong-model' / 'manifest.json'
    manifest = json.loads(manifest_path.read_text())
    manifest['fingerprint'] = '0' * 32
    manifest_path.write_text(json.dumps(manifest))
    failed(client.load('wrong-model'), 'FINGERPRINT_MISMATCH')

    ok(client.save('to-disk', name='truncated'))
    payload = node.capsule_dir / 'truncated' / 'payload.safetensors'
    payload.write_bytes(payload.read_bytes()[:payload.stat().st_size // 2])
    failed(client.load('truncated'), 'CORRUPT_FILE')

    ok(client.save('to-disk', name='altered'))
    payload = node.capsule_dir / 'altered' / 'payload.safetensors'
    data = bytearray(payload.read_bytes())
    data[-1] ^= 0xFF
    payload.write_bytes(bytes(data))
    failed(client.load('altered'), 'CORRUPT_FILE')

    (node.capsule_dir / 'not-a-capsule').mkdir()
    (node.capsule_dir / 'not-a-capsule' / 'manifest.json').write_text('{"magic": "nope"}')
    failed(client.load('not-a-capsule'), 'CORRUPT_FILE')

    # The capsule directory replaced by a plain file: writing fails with IO_ERROR.
    moved = node.capsule_dir.with_name(node.capsule_dir.name + '-moved')
    node.capsule_dir.rename(moved)
    try:
        node.capsule_dir.write_text('not a directory')
        failed(client.save('to-disk', name='io-error'), 'IO_ERROR')
        node.capsule_dir.unlink()
    finally:
        moved.rename(node.capsule_dir)
    for capsule_id in ('to-disk', 'to-disk-copy'):
        ok(client.release(capsule_id))


def test_generate_streams_feedback_and_honours_stop_strings(client):
    """Feedback carries every token; TTFT and rate are reported; stop strings cut the text."""
    session_id = new_session(client).session_id
    before = ok(client.snapshot(session_id, label='before-reply')).capsule
    feedback = []
    result = ok(generate(client, session_id=session_id, max_new_tokens=8,
                         on_feedback=feedback.append, snapshot_after=True,
                         label='after-reply', pin=True))
    assert result.session_id == session_id
    # no prompt: only the template's reply header is prefilled, and prompt_tokens counts it
    assert result.prompt_tokens > 0
    assert result.capsule.num_tokens == (before.num_tokens + result.prompt_tokens
                                         + result.generated_tokens)
    assert result.generated_tokens == len(result.token_ids) > 0
    streamed = [token for message in feedback for token in message.token_ids]
    assert result.stop_reason in (Generate.Result.STOP_EOS, Generate.Result.STOP_MAX_TOKENS)
    assert streamed == list(result.token_ids)  # the end-of-sequence token is streamed too
    assert [message.num_generated for message in feedback] == list(range(1, len(feedback) + 1))
    assert ''.join(message.text_delta for message in feedback) == result.text
    assert result.ttft_ms > 0
    if result.generated_tokens > 1:  # a rate needs two tokens
        assert result.tokens_per_second > 0
    assert result.capsule.capsule_id == 'after-reply' and result.capsule.pinned
    assert result.capsule.parent_id == 'before-reply'

    text = result.text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip(), text
    ok(client.restore('before-reply'))
    stopped = ok(generate(client, session_id=session_id, max_new_tokens=8, stop=[stop]))
    assert stopped.stop_reason == Generate.Result.STOP_STRING
    assert stopped.text == text[:text.index(stop)]
    for capsule_id in ('before-reply', 'after-reply'):
        ok(client.release(capsule_id))


def test_generate_with_a_prompt_opens_a_session(client):
    """An empty session_id opens a new session; prompt tokens are counted."""
    result = ok(generate(client, prompt='Which shelf holds the toolbox?', max_new_tokens=3,
                         snapshot_after=True))
    assert result.session_id in ok(client.list_capsules()).sessions
    # every token in the session is a prompt token (template and reply header included) or a
    # generated one (the node runs without a system prompt)
    assert result.prompt_tokens > 5
    assert result.capsule.num_tokens == result.prompt_tokens + result.generated_tokens
    ok(client.release(result.capsule.capsule_id))


def test_generate_cancel_stops_within_a_token(client):
    """Cancel after three tokens: canceled status, a clean boundary, the session usable."""
    session_id = counting_session(client)
    cancel = threading.Event()
    feedback = []

    def on_feedback(message):
        feedback.append(message)
        if len(feedback) == 3:
            cancel.set()

    status, result = client.generate(session_id=session_id, max_new_tokens=1000,
                                     on_feedback=on_feedback, cancel=cancel)
    assert status == GoalStatus.STATUS_CANCELED
    ok(result)
    assert result.stop_reason == Generate.Result.STOP_CANCELED
    # The node checks the cancel before every token (exactly: test_cancel_stops_before_the_
    # next_token_at_a_clean_boundary); here the tokens decoded while the cancel crosses DDS
    # follow too: about 20 ms each, so the bound allows ~1 s of transport on a busy machine.
    assert 3 <= result.generated_tokens < 3 + 50, result.generated_tokens
    assert len(result.token_ids) == result.generated_tokens
    after = ok(client.snapshot(session_id)).capsule
    more = ok(generate(client, session_id=session_id, max_new_tokens=2))
    assert more.generated_tokens >= 1
    ok(client.release(after.capsule_id))


def test_restore_then_continue_equals_the_uninterrupted_run(client):
    """Greedy: restore + continue produces the same token ids as never stopping."""
    session_id = new_session(client).session_id
    ok(client.snapshot(session_id, label='eq-start'))
    full = ok(generate(client, session_id=session_id, max_new_tokens=8)).token_ids
    assert len(full) == 8, 'the model ended early; choose a longer-answer prompt'

    ok(client.restore('eq-start'))
    first = ok(generate(client, session_id=session_id, max_new_tokens=4, snapshot_after=True,
                        label='eq-mid')).token_ids
    second = ok(generate(client, session_id=session_id, max_new_tokens=4)).token_ids
    assert list(first) + list(second) == list(full)

    rolled_back = ok(client.restore('eq-mid'))
    assert rolled_back.session_id == session_id and rolled_back.copied_bytes == 0
    again = ok(generate(client, session_id=session_id, max_new_tokens=4)).token_ids
    assert list(again) == list(full[4:])

    (branch_id,) = ok(client.branch('eq-mid', 1)).session_ids
    in_branch = ok(generate(client, session_id=branch_id, max_new_tokens=4)).token_ids
    assert list(in_branch) == list(full[4:])

    ok(client.close_session(session_id))
    reopened = ok(client.restore('eq-mid'))  # its session is gone: a new one is opened
    assert reopened.session_id not in (session_id, branch_id)
    assert reopened.copied_bytes > 0
    fresh = ok(generate(client, session_id=reopened.session_id, max_new_tokens=4)).token_ids
    assert list(fresh) == list(full[4:])
    for capsule_id in ('eq-start', 'eq-mid'):
        ok(client.release(capsule_id))


def test_branches_are_isolated(client):
    """What one branch appends and generates never shows up in another."""
    session_id = new_session(client).session_id
    root = ok(client.snapshot(session_id, label='iso-root')).capsule
    first, second = ok(client.branch('iso-root', 2)).session_ids
    observation = {'role': Generate.Goal.ROLE_OBSERVATION, 'max_new_tokens': 4}
    ok(generate(client, session_id=first, prompt='Shelf C is empty.', **observation))
    in_second = ok(generate(client, session_id=second, prompt='The door is locked.',
                            **observation))
    ok(client.restore('iso-root', session_id=first))
    replayed = ok(generate(client, session_id=first, prompt='The door is locked.',
                           **observation))
    assert list(replayed.token_ids) == list(in_second.token_ids)
    assert ok(client.snapshot(session_id)).capsule.num_tokens == root.num_tokens
    listed = {info.capsule_id: info for info in ok(client.list_capsules()).capsules}
    assert listed['iso-root'].num_tokens == root.num_tokens
    ok(client.release('iso-root'))


def test_events_topic_reports_each_capsule_verb(client, node):
    """/capsule/events carries one message per created/restored/branched/... capsule."""
    received = []
    subscription = client.node.create_subscription(
        CapsuleEvent, '/capsule/events', received.append, 100)
    try:
        session_id = new_session(client).session_id
        # Give discovery time to match the new subscription with the node's publisher.
        for _ in range(40):
            client.spin_once(0.05)
        ok(client.snapshot(session_id, label='ev-cap'))
        ok(client.restore('ev-cap'))
        ok(client.branch('ev-cap', 1))
        ok(client.save('ev-cap', name='ev-saved'))
        ok(client.load('ev-saved'))
        ok(client.release('ev-saved'))
        ok(client.release('ev-cap'))
        expected = [
            (CapsuleEvent.CREATED, 'ev-cap'), (CapsuleEvent.RESTORED, 'ev-cap'),
            (CapsuleEvent.BRANCHED, 'ev-cap'), (CapsuleEvent.SAVED, 'ev-cap'),
            (CapsuleEvent.LOADED, 'ev-saved'), (CapsuleEvent.RELEASED, 'ev-saved'),
            (CapsuleEvent.RELEASED, 'ev-cap')]
        for _ in range(200):
            if len(received) >= len(expected):
                break
            client.spin_once(0.05)
        assert [(event.kind, event.capsule_id) for event in received] == expected
        assert received[0].session_id == session_id
        assert received[0].stamp.sec > 0
        assert received[3].detail.endswith('ev-saved')
    finally:
        client.node.destroy_subscription(subscription)


def test_diagnostics_report_model_budget_and_latencies(client):
    """/diagnostics carries the engine status: model, fingerprint, budget, counts."""
    name, values = latest_diagnostics(client)
    assert name == '/capsule: policy engine'
    assert 'SmolLM2' in values['model']
    assert len(values['fingerprint']) == 32
    assert int(values['budget_bytes']) == BUDGET_BYTES
    assert int(values['used_bytes']) <= BUDGET_BYTES
    live = len(ok(client.list_capsules()).capsules)
    assert int(values['capsules']) == live and int(values['max_sessions']) == 6
    assert 'last_snapshot_ms' in values  # earlier tests snapshotted


def test_cli_drives_every_subcommand(client):
    """capsule_ctl: human output by default, --json, non-zero exit on errors."""
    appended = run_cli('append', BRIEFING, '--json')
    assert appended.returncode == 0, appended.stderr
    session_id = json.loads(appended.stdout)['session_id']
    snapshot = run_cli('snapshot', session_id, '--label', 'cli-root', '--pin')
    assert snapshot.returncode == 0, snapshot.stderr
    assert 'cli-root' in snapshot.stdout and 'pinned' in snapshot.stdout
    generated = run_cli('generate', 'Plan the first step.', '--session', session_id,
                        '--max-new-tokens', '3', '--snapshot-after', '--label', 'cli-child')
    assert generated.returncode == 0, generated.stderr
    assert f'[session {session_id}:' in generated.stdout and 'capsule cli-child' in (
        generated.stdout)
    listed = run_cli('list')
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    root_line = next(index for index, line in enumerate(lines) if line.startswith('cli-root'))
    assert lines[root_line + 1].startswith('└── cli-child'), listed.stdout
    branched = run_cli('branch', 'cli-root', '1', '--json')
    assert branched.returncode == 0 and len(json.loads(branched.stdout)['session_ids']) == 1
    restored = run_cli('restore', 'cli-root', '--json')
    assert json.loads(restored.stdout)['session_id'] == session_id
    saved = run_cli('save', 'cli-child', '--name', 'cli-saved')
    assert saved.returncode == 0 and 'saved to' in saved.stdout
    loaded = run_cli('load', 'cli-saved', '--json')
    assert json.loads(loaded.stdout)['capsule']['capsule_id'] == 'cli-saved'
    for capsule_id in ('cli-saved', 'cli-child', 'cli-root'):
        assert run_cli('release', capsule_id).returncode == 0
    missing = run_cli('release', 'cli-root')
    assert missing.returncode == 1
    assert 'UNKNOWN_CAPSULE' in missing.stderr
    as_json = run_cli('release', 'cli-root', '--json')
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout)['error_code'] == 'UNKNOWN_CAPSULE'
    closed = run_cli('close', session_id)
    assert closed.returncode == 0, closed.stderr


def test_mixed_service_load_during_a_generation(client, context):
    """
    Thousands of mixed calls from 4 threads while a generation runs: all answered, all sane.

    Calls on idle sessions succeed; calls on the generating session are BUSY; list is never
    blocked. Counts only, no timings.
    """
    busy = counting_session(client)
    ok(client.snapshot(busy, label='busy-cap'))
    idle = [new_session(client, f'Robot {index} waits at the dock.').session_id
            for index in range(2)]
    started = threading.Event()
    cancel = threading.Event()
    outcome = {}

    def run_generation():
        generator = CapsuleClient(timeout_s=TIMEOUT_S, context=context,
                                  client_name='load_generator')
        try:
            outcome['status'], outcome['result'] = generator.generate(
                session_id=busy, max_new_tokens=1500, cancel=cancel,
                on_feedback=lambda message: started.set())
        finally:
            generator.close()
            started.set()

    thread = threading.Thread(target=run_generation, daemon=True)
    thread.start()
    assert started.wait(timeout=120.0)
    assert 'result' not in outcome, outcome
    # 600 calls: within the 1500-token generation on a 2-core machine (1200 outlasted it on
    # the Jazzy leg, whose service round trips are slower)
    calls_per_thread = 150
    report = run_load(idle_sessions=idle, busy_session=busy, busy_capsule='busy-cap',
                      num_threads=4, calls_per_thread=calls_per_thread, context=context,
                      timeout_s=TIMEOUT_S)
    still_generating = 'result' not in outcome
    cancel.set()
    thread.join(timeout=120.0)
    assert still_generating, (
        'the generation ended before the load did; the BUSY expectations need it running: '
        f'status {outcome.get("status")}, {outcome["result"].generated_tokens} tokens')
    assert outcome['status'] == GoalStatus.STATUS_CANCELED
    calls = 4 * calls_per_thread
    assert report.calls == sum(report.codes.values()) == calls  # every call answered
    assert report.unanswered == 0
    assert report.wrong == [], report.wrong[:10]
    per_kind = calls // 6  # run_load cycles through six kinds of call
    assert report.codes[('snapshot', 'BUSY')] == report.codes[('restore', 'BUSY')] == per_kind
    assert report.codes[('list', 'OK')] == per_kind
    assert report.codes[('snapshot', 'OK')] == per_kind
    # No capsule leaked: only busy-cap is left of this test's capsules.
    capsules = ok(client.list_capsules()).capsules
    assert [info.capsule_id for info in capsules if info.session_id in idle] == []
    ok(client.release('busy-cap'))
