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

from capsule_ros.ros.client import CapsuleClient
from capsule_ros.runtime.testing import write_random_mtp_head, write_tiny_model
from capsule_ros.srv import Append
from node_process import generate_ok
from node_process import greedy_in_process
from node_process import latest_diagnostics
from node_process import light_parameters
from node_process import NodeProcess
from node_process import ok
import pytest

TIMEOUT_S = 30.0
PROMPT = ('Route: dock, aisle 2, shelf C, aisle 2, dock. Route: dock, aisle 4, shelf F, '
          'aisle 4, dock. Route: dock, aisle 2, shelf C, aisle 2, dock. Route: dock,')


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
        first = generate_ok(client, session_id, 40)
        assert first.accepted_tokens <= first.drafted_tokens
        assert first.drafted_tokens > 0 and (mode == 'mtp' or first.accepted_tokens > 0)
        assert list(first.token_ids) == greedy_in_process(model_dir, tmp_path, PROMPT, 40)
        ok(client.snapshot(session_id, label='mid-route'))
        expected = generate_ok(client, session_id, 12)
        ok(client.restore('mid-route'))
        again = generate_ok(client, session_id, 12)
        assert list(again.token_ids) == list(expected.token_ids)

        _, values = latest_diagnostics(client)
        assert values['speculative'] == f'{mode} (k=4)'
        drafted = sum(result.drafted_tokens for result in (first, expected, again))
        accepted = sum(result.accepted_tokens for result in (first, expected, again))
        assert int(values['drafted_tokens']) == drafted
        assert int(values['accepted_tokens']) == accepted
    finally:
        client.close()
        assert process.stop() is not None
        assert 'Traceback' not in process.output(), process.output()
