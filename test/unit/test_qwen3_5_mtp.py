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
Qwen3.5's MTP head against transformers 5.x's generic ``MtpModel`` (random weights, fp32).

transformers drops a Qwen3.5 checkpoint's ``mtp.*`` weights; its ``MtpModel`` (enorm, hnorm,
eh_proj, mtp_block, post_norm, the shared head) is the numerical reference. Every parameter of
it is randomized (norms included), renamed to the checkpoint's names and loaded into
``MtpHead``. Then the head's hidden states and logits at every position match, in one
pass and step by step against its own KV cache, and a chained step (depth 2) matches
``MtpModel`` fed its own output.
"""

from capsule_ros.runtime.errors import InvalidArgumentError
from capsule_ros.runtime.models.mtp import has_mtp_head, MtpHead
from capsule_ros.runtime.models.qwen3_5 import Qwen35Config, Qwen35Model
from capsule_ros.runtime.testing import TINY_CONFIGS
import pytest
import torch

VOCAB = 512
MAX_SEQ_LEN = 64
LENGTH = 12
TOLERANCE = 2e-5  # fp32; transformers and this head sum in other orders
# transformers' MtpLayer name -> the Qwen3.5 checkpoint's
RENAMES = [('layers.0.eh_proj.', 'mtp.fc.'),
           ('layers.0.enorm.', 'mtp.pre_fc_norm_embedding.'),
           ('layers.0.hnorm.', 'mtp.pre_fc_norm_hidden.'),
           ('layers.0.mtp_block.', 'mtp.layers.0.'),
           ('layers.0.post_norm.', 'mtp.norm.')]


@pytest.fixture(scope='module')
def pair():
    """Build transformers' main model and MtpModel, and ours on the same random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_layers import MtpModel
    values = {key: value for key, value in TINY_CONFIGS['qwen3_5_text'].items()
              if key != 'model_type'}
    config = AutoConfig.for_model('qwen3_5_text', vocab_size=VOCAB, **values)
    config.num_mtp_layers = 1
    config.mtp_layer_types = ['full_attention']
    torch.manual_seed(0)
    main = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    mtp = MtpModel(main, 1).eval()
    with torch.no_grad():
        for name, parameter in mtp.named_parameters():
            if name.startswith('layers.'):  # not the shared embedding / head
                parameter.normal_(0.0, 0.1 if parameter.dim() == 1 else 0.05)
    weights = {name: tensor.clone() for name, tensor in main.state_dict().items()}
    for name, tensor in mtp.state_dict().items():
        for theirs, ours in RENAMES:
            if name.startswith(theirs):
                weights[ours + name[len(theirs):]] = tensor.clone()
    ours = Qwen35Model(Qwen35Config.from_hf(config.to_dict()), weights, torch.float32,
                       torch.device('cpu'), MAX_SEQ_LEN)
    assert has_mtp_head(weights) and not has_mtp_head(main.state_dict())
    return main, mtp, ours, MtpHead(ours, weights)


def reference(main, mtp, ids):
    """Return transformers' normed hidden states, the head's output and logits at 1..L-1."""
    from transformers.cache_utils import MtpCache
    with torch.no_grad():
        hidden = main(ids[None], output_hidden_states=True).hidden_states[-1][0]  # [L, D]
        cache = MtpCache(config=main.config.get_mtp_config())
        positions = torch.arange(1, ids.shape[0])[None]
        out = mtp.forward_layer(0, hidden[None, :-1], positions, cache,
                                input_ids=ids[None, 1:])[0]  # [L - 1, D]
        return hidden, out, mtp._project_to_logits(out), cache


def new_kv(head):
    return torch.zeros(head.state_specs()[0].shape, dtype=torch.float32)


def test_head_matches_transformers_mtp_model_in_one_pass(pair):
    main, mtp, ours, head = pair
    ids = torch.randint(0, VOCAB, (LENGTH,), generator=torch.Generator().manual_seed(1))
    hidden, out, logits, _ = reference(main, mtp, ids)
    got = head.forward(ids[1:], hidden[:-1], 1, new_kv(head))
    torch.testing.assert_close(got, out, rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(head.logits(got), logits, rtol=0, atol=TOLERANCE)


def test_head_step_by_step_against_its_kv_cache_matches(pair):
    main, mtp, ours, head = pair
    ids = torch.randint(0, VOCAB, (LENGTH,), generator=torch.Generator().manual_seed(2))
    hidden, out, logits, _ = reference(main, mtp, ids)
    kv = new_kv(head)
    first = head.forward(ids[1:5], hidden[:4], 1, kv)  # a prefill of 4, then one at a time
    steps = [first] + [head.forward(ids[position:position + 1], hidden[position - 1:position],
                                    position, kv) for position in range(5, LENGTH)]
    torch.testing.assert_close(torch.cat(steps), out, rtol=0, atol=TOLERANCE)


def test_a_chained_step_matches_mtp_model_fed_its_own_output(pair):
    """Depth 2 by chaining: the head's output hidden state and drafted token go back in."""
    main, mtp, ours, head = pair
    ids = torch.randint(0, VOCAB, (LENGTH,), generator=torch.Generator().manual_seed(3))
    hidden, out, logits, cache = reference(main, mtp, ids)
    kv = new_kv(head)
    got = head.forward(ids[1:], hidden[:-1], 1, kv)
    draft = int(torch.argmax(head.logits(got[-1:])))
    assert draft == int(torch.argmax(logits[-1]))
    chained = head.forward(torch.tensor([draft]), got[-1:], LENGTH, kv)
    with torch.no_grad():
        expected = mtp.forward_layer(0, out[None, -1:], torch.tensor([[LENGTH]]), cache,
                                     input_ids=torch.tensor([[draft]]))[0]
    torch.testing.assert_close(chained, expected, rtol=0, atol=TOLERANCE)


def test_position_zero_and_more_than_one_layer_are_refused(pair):
    main, mtp, ours, head = pair
    with pytest.raises(InvalidArgumentError, match='positions'):
        head.forward(torch.tensor([1]), torch.zeros(1, 64), 0, new_kv(head))
    weights = {'mtp.layers.0.x': torch.zeros(1), 'mtp.layers.1.x': torch.zeros(1)}
    with pytest.raises(InvalidArgumentError, match='exactly one layer'):
        MtpHead(ours, weights)
