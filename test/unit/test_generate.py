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
"""Incremental detokenization on the real tokenizer: the same text, a bounded window."""

from capsule_ros.runtime.chat import TurnState
from capsule_ros.runtime.generate import IncrementalDetokenizer, StopReason
from capsule_ros.runtime.loader import load_tokenizer, resolve_model
import pytest
import torch


@pytest.fixture(scope='module')
def tokenizer():
    """Return the default model's tokenizer."""
    return load_tokenizer(resolve_model('').directory)


class CountingTokenizer:
    """The real tokenizer, recording how many tokens each decode call is given."""

    def __init__(self, tokenizer):
        """Wrap ``tokenizer``."""
        self.tokenizer = tokenizer
        self.lengths = []

    def decode(self, tokens, **kwargs):
        """Decode with the real tokenizer; record the window length."""
        self.lengths.append(len(tokens))
        return self.tokenizer.decode(tokens, **kwargs)


@pytest.mark.parametrize('source', ['text', 'random'])
def test_incremental_text_equals_a_full_decode(tokenizer, source):
    if source == 'text':  # multi-byte characters split across byte-level tokens
        tokens = tokenizer('Robot 🤖 moves to the Übergabe station — 机器人 at 0.5 m/s. Done!',
                           add_special_tokens=False)['input_ids']
    else:
        generator = torch.Generator().manual_seed(3)
        tokens = torch.randint(0, tokenizer.vocab_size, (400,), generator=generator).tolist()
    detokenizer = IncrementalDetokenizer(tokenizer)
    streamed = ''.join(detokenizer.add(token) for token in tokens) + detokenizer.flush()
    expected = tokenizer.decode(tokens, skip_special_tokens=True)
    assert streamed == detokenizer.text == expected


def test_each_token_decodes_a_short_window_not_the_whole_text(tokenizer):
    counting = CountingTokenizer(tokenizer)
    detokenizer = IncrementalDetokenizer(counting)
    tokens = tokenizer('The robot goes left. ' * 100, add_special_tokens=False)['input_ids']
    for token in tokens:
        detokenizer.add(token)
    assert len(tokens) > 400
    assert max(counting.lengths) <= 8  # a full decode per token would reach len(tokens)


def test_end_of_sequence_token_is_streamed_and_in_the_result(tiny_engine):
    engine = tiny_engine
    session = engine.create_session(system_prompt=False)
    engine.append(session, 'Where is the red cup?')
    expected = engine.generate(session, 4, reply=False).token_ids
    engine.close_session(session)
    # the third greedy token plays end-of-sequence (what the tokenizer's EOS id does)
    engine.eos_token_ids = frozenset([expected[2]])
    session = engine.create_session(system_prompt=False)
    engine.append(session, 'Where is the red cup?')
    streamed = []
    result = engine.generate(session, 8, reply=False,
                             on_token=lambda token, delta: streamed.append(token))
    assert result.stop_reason is StopReason.EOS
    assert list(result.token_ids) == streamed == list(expected[:3])
    assert engine.session_tokens(session)[-3:] == streamed  # it is in the journal


def test_the_reply_header_is_counted(tiny_engine):
    """The reply header generate prefilled is counted: every token is prompt or generated."""
    engine = tiny_engine
    session = engine.create_session(system_prompt=False)
    prompt_tokens = engine.append(session, 'Where is the red cup?')
    result = engine.generate(session, 3)
    header = engine.tokenize(engine.chat.reply_header(TurnState.IDLE))
    assert result.header_tokens == len(header) > 0
    assert engine.session_position(session) == (prompt_tokens + result.header_tokens
                                                + len(result.token_ids))
    # a reply already open gets no second header
    assert engine.generate(session, 2).header_tokens == 0
    assert engine.generate(session, 2, reply=False).header_tokens == 0
