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
"""Token selection draws from the right distribution, never from masked tokens."""

import collections

from capsule_ros.runtime.config import SamplingConfig
from capsule_ros.runtime.sampling import new_generator, select_token
import torch

LOGITS = torch.tensor([2.0, 1.0, 0.0, -1.0, 1.5, float('-inf')])  # [V], the last impossible


def frequencies(sampling, draws=20000):
    """Return how often each token is drawn from LOGITS, as fractions."""
    generator = new_generator(sampling.seed)
    counts = collections.Counter(
        select_token(LOGITS, sampling, generator) for _ in range(draws))
    return torch.tensor([counts[index] / draws for index in range(LOGITS.shape[0])])


def test_sampled_frequencies_follow_the_softmax():
    """Temperature 0.7: every token's frequency is its softmax probability (to 0.015)."""
    sampling = SamplingConfig(temperature=0.7, seed=1)
    expected = torch.softmax(LOGITS / 0.7, dim=-1)
    assert float((frequencies(sampling) - expected).abs().max()) < 0.015


def test_top_k_and_top_p_never_draw_masked_tokens():
    """top_k=2 keeps tokens 0 and 4; top_p=0.5 keeps what reaches half the mass first."""
    top_k = frequencies(SamplingConfig(temperature=1.0, top_k=2, seed=2))
    assert set(torch.nonzero(top_k).flatten().tolist()) == {0, 4}
    expected = torch.softmax(LOGITS[[0, 4]], dim=-1)
    assert float((top_k[[0, 4]] - expected).abs().max()) < 0.015
    top_p = frequencies(SamplingConfig(temperature=1.0, top_p=0.5, seed=3))
    assert set(torch.nonzero(top_p).flatten().tolist()) == {0, 4}


def test_same_seed_same_tokens_and_greedy_takes_no_randomness():
    """A seed fixes the sequence; greedy selection leaves the generator untouched."""
    sampling = SamplingConfig(temperature=1.0, seed=5)
    first, second = new_generator(5), new_generator(5)
    assert ([select_token(LOGITS, sampling, first) for _ in range(50)]
            == [select_token(LOGITS, sampling, second) for _ in range(50)])
    state = first.get_state()
    assert select_token(LOGITS, SamplingConfig(), first) == 0
    assert torch.equal(first.get_state(), state)
