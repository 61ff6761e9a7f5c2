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
The node with ``generation.speculative:=lookup`` and ``:=mtp``, over real DDS.

The Generate result reports drafted and accepted tokens, its tokens are those of plain greedy
decoding (an engine in this process, speculation off, on the same checkpoint), a capsule taken
after a speculative generation continues exactly, and /diagnostics counts the drafts. The MTP
case runs a random MTP head (its drafts are nearly all rejected; the output is unchanged).
"""

from action_msgs.msg import GoalStatus
from capsule_ros.ros.client import CapsuleClient
from capsule_ros.runtime.config import PolicyConfig
from capsule_ros.runtime.engine import PolicyEngine
from capsule_ros.runtime.testing import write_random_mtp_head, write_tiny_model
from capsule_ros.srv import Append
from diagnostic_msgs.msg import DiagnosticArray
from node_process import light_parameters
from node_process import NodeProcess
from node_process import ok
import pytest

TIMEOUT_S = 30.0
PROMPT = ('Route: dock, aisle 2, shelf C, aisle 2, dock. Route: dock, aisle 4, shelf F, '
          'aisle 4, dock. Route: dock, aisle 2, shelf C, aisle 2, dock. Route: dock,')


def generate(client, session_id, max_new_tokens):
    """Continue ``session_id`` greedily; return the result."""
    status, result = client.generate(session_id=session_id, max_new_tokens=max_new_tokens)
    assert status == GoalStatus.STATUS_SUCCEEDED, result.message
    return ok(result)


def plain_greedy(model_dir, tmp_path, steps):
    """Tokens of plain greedy decoding (speculation off) of PROMPT, in this process."""
    engine = PolicyEngine(PolicyConfig.from_dict({
        'model': {'path': str(model_dir), 'dtype': 'float32'},
        'engine': {'max_seq_len': 512, 'max_sessions': 1},
        'capsules': {'dir': str(tmp_path / 'reference-capsules')}}), progress=None)
    session = engine.create_session(system_prompt=False)
    engine.append(session, PROMPT, role='raw')
    return list(engine.generate(session, steps, speculative='off').token_ids)


@pytest.mark.parametrize('mode', ['lookup', 'mtp'])
def test_speculative_node_reports_drafts_and_continues_exactly(tmp_path, context, mode):
    model_dir = write_tiny_model(tmp_path / 'llama')
    if mode == 'mtp':
        write_random_mtp_head(model_dir)
    process = NodeProcess(tmp_path / 'node.log',
                          *light_parameters(tmp_path / 'capsules', dtype='float32'),
                          '-p', f'model.path:={model_dir}', '-p', 'engine.max_seq_len:=512',
                          '-p', f'generation.speculative:={mode}',
                          '-p', 'generation.num_draft_tokens:=4')
    client = CapsuleClient(timeout_s=TIMEOUT_S, context=context, client_name='speculative')
    try:
        process.wait_until_active(client)
        session_id = ok(client.append(PROMPT, role=Append.Request.ROLE_RAW)).session_id
        first = generate(client, session_id, 40)
        assert first.accepted_tokens <= first.drafted_tokens
        assert first.drafted_tokens > 0 and (mode == 'mtp' or first.accepted_tokens > 0)
        assert list(first.token_ids) == plain_greedy(model_dir, tmp_path, 40)
        ok(client.snapshot(session_id, label='mid-route'))
        expected = generate(client, session_id, 12)
        ok(client.restore('mid-route'))
        again = generate(client, session_id, 12)
        assert list(again.token_ids) == list(expected.token_ids)

        received = []
        subscription = client.node.create_subscription(
            DiagnosticArray, '/diagnostics', received.append, 10)
        for _ in range(100):
            if received:
                break
            client.spin_once(0.1)
        client.node.destroy_subscription(subscription)
        assert received, 'no /diagnostics message within 10 s'
        values = {item.key: item.value for item in received[-1].status[0].values}
        assert values['speculative'] == f'{mode} (k=4)'
        drafted = sum(result.drafted_tokens for result in (first, expected, again))
        accepted = sum(result.accepted_tokens for result in (first, expected, again))
        assert int(values['drafted_tokens']) == drafted
        assert int(values['accepted_tokens']) == accepted
    finally:
        client.close()
        assert process.stop() is not None
        assert 'Traceback' not in process.output(), process.output()
