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
Prompt-lookup speculation on the real SmolLM2 weights.

In the node's default numerics (bf16, 4-bit decode weights) a verify pass computes every row
with the decode kernels, so speculation is bit for bit plain greedy decoding: the same tokens,
the same journal and the same last logits, with drafts accepted and rejected along the way.
In fp32 (dense weights: batched rows round differently) the tokens are the same.
"""

from conftest import BRIEFING
import pytest
import torch

PLAN = ('Plan: go to aisle 7, level 2; pick two boxes of M6 bolts; go to packing station B; '
        'report. Repeat the plan step by step.')


def greedy(engine, speculative, steps=64, num_draft_tokens=4):
    session = engine.create_session(system_prompt=False)
    engine.append(session, BRIEFING)
    engine.append(session, PLAN)
    result = engine.generate(session, steps, speculative=speculative,
                             num_draft_tokens=num_draft_tokens)
    state = engine.session_tokens(session), engine.session_logits(session)
    engine.close_session(session)
    return result, state


@pytest.mark.parametrize('num_draft_tokens', [2, 6])
def test_lookup_speculation_is_plain_greedy_on_the_real_model(capsule_engine, num_draft_tokens):
    plain, (plain_journal, plain_logits) = greedy(capsule_engine, 'off')
    fast, (fast_journal, fast_logits) = greedy(capsule_engine, 'lookup',
                                               num_draft_tokens=num_draft_tokens)
    assert fast.drafted_tokens > fast.accepted_tokens > 0  # accepts and rejects both happen
    assert fast.token_ids == plain.token_ids
    assert fast_journal == plain_journal
    if capsule_engine.dtype == torch.bfloat16:
        assert torch.equal(fast_logits, plain_logits)  # bitwise: the decode kernels, row by row
    else:
        torch.testing.assert_close(fast_logits, plain_logits, rtol=0, atol=1e-3)
