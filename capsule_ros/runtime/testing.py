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
Small random-weight models for fast exact tests of the runtime.

They are real Hugging Face checkpoints (``config.json`` + safetensors) written by transformers
from a config, with the default model's tokenizer, so every code path of the loader and the
engine runs on them; only the sizes are small.
"""

import json
from pathlib import Path
import shutil

from capsule_ros.runtime import loader
import torch


TINY_LLAMA = {
    'model_type': 'llama', 'hidden_size': 64, 'intermediate_size': 128,
    'num_hidden_layers': 2, 'num_attention_heads': 4, 'num_key_value_heads': 2,
    'max_position_embeddings': 1024, 'rms_norm_eps': 1e-5, 'tie_word_embeddings': True,
    'rope_theta': 10000.0,
}
# LFM2: gated short convolution (kernel 3) in layers 0 and 2, GQA attention in 1 and 3
TINY_LFM2 = {
    'model_type': 'lfm2', 'hidden_size': 64, 'intermediate_size': 128,
    'num_hidden_layers': 4, 'num_attention_heads': 4, 'num_key_value_heads': 2,
    'max_position_embeddings': 2048, 'norm_eps': 1e-5, 'tie_word_embeddings': True,
    'conv_L_cache': 3, 'block_auto_adjust_ff_dim': False,
    'layer_types': ['conv', 'full_attention', 'conv', 'full_attention'],
}
# Qwen3.5: Gated DeltaNet (conv kernel 4, 4 value heads over 2 key heads) in layers 0-2,
# gated GQA attention with partial RoPE in layer 3
TINY_QWEN3_5 = {
    'model_type': 'qwen3_5_text', 'hidden_size': 64, 'intermediate_size': 128,
    'num_hidden_layers': 4, 'num_attention_heads': 4, 'num_key_value_heads': 2,
    'head_dim': 16, 'max_position_embeddings': 2048, 'rms_norm_eps': 1e-6,
    'tie_word_embeddings': False, 'linear_conv_kernel_dim': 4, 'linear_key_head_dim': 16,
    'linear_value_head_dim': 16, 'linear_num_key_heads': 2, 'linear_num_value_heads': 4,
    'layer_types': ['linear_attention', 'linear_attention', 'linear_attention',
                    'full_attention'],
}
TINY_CONFIGS = {'llama': TINY_LLAMA, 'lfm2': TINY_LFM2, 'qwen3_5_text': TINY_QWEN3_5}


def write_tiny_model(directory: Path, overrides: dict | None = None, seed: int = 0,
                     family: str = 'llama') -> Path:
    """
    Write a random-weight checkpoint of ``family`` with the bundled tokenizer to ``directory``.

    ``family`` is a key of ``TINY_CONFIGS``; ``overrides`` change the config (e.g. RoPE
    scaling, q/k norm via ``model_type='qwen3'``, other sizes).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    tokenizer_source = loader.resolve_model('').directory
    values = dict(TINY_CONFIGS[family], **(overrides or {}))
    model_type = values.pop('model_type')
    vocab_size = json.loads((tokenizer_source / 'config.json').read_text())['vocab_size']
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, **values)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, parameter in model.named_parameters():  # larger weights: logits far from ties
            if name.endswith('A_log') or name.endswith('dt_bias'):
                continue  # decay parameters keep their initialization (a stable recurrence)
            parameter.normal_(0.0, 0.2)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    copy_bundled_tokenizer(directory)
    return directory


# the attention layer an MTP block copies its shapes from, and its norm weight, per family
MTP_TEMPLATE_NORM = {'llama': 'input_layernorm.weight', 'lfm2': 'operator_norm.weight',
                     'qwen3_5': 'input_layernorm.weight'}


def write_random_mtp_head(directory: Path, seed: int = 0, std: float | None = None) -> Path:
    """
    Add a random MTP head (``mtp.*`` in ``mtp.safetensors``) to the checkpoint in ``directory``.

    The block ``mtp.layers.0.*`` has the shapes and names of the model's first attention
    layer, its matrices drawn with ``std`` (default: each source matrix's own) and its norms
    copied; ``mtp.fc`` is drawn with std 1 / sqrt(2 D). No real drafts are expected from it:
    it exercises the MTP state and the mechanism's cost.
    """
    from safetensors.torch import save_file

    from capsule_ros.runtime.models import registry

    directory = Path(directory)
    hf_config, weights = loader.load_hf_directory(directory)
    family = registry.family_of(hf_config)
    config = registry.config_from_hf(hf_config)
    layer_types = getattr(config, 'layer_types', None) or ['full_attention']
    index = list(layer_types).index('full_attention')
    source = next(prefix for prefix in (f'model.layers.{index}.',
                                        f'model.language_model.layers.{index}.')
                  if any(name.startswith(prefix) for name in weights))
    generator = torch.Generator().manual_seed(seed)

    def draw(shape, scale):
        return torch.randn(shape, generator=generator) * scale

    head = {}
    for name, tensor in weights.items():
        if not name.startswith(source):
            continue
        tensor = tensor.float()
        if tensor.dim() == 1:
            head['mtp.layers.0.' + name[len(source):]] = tensor.clone()
        else:
            head['mtp.layers.0.' + name[len(source):]] = draw(
                tensor.shape, std if std is not None else float(tensor.std()))
    norm = weights[source + MTP_TEMPLATE_NORM[family]].float()
    hidden_size = norm.shape[0]
    for name in ('pre_fc_norm_embedding', 'pre_fc_norm_hidden', 'norm'):
        head[f'mtp.{name}.weight'] = norm.clone()
    head['mtp.fc.weight'] = draw((hidden_size, 2 * hidden_size), (2 * hidden_size) ** -0.5)
    save_file({name: tensor.contiguous() for name, tensor in head.items()},
              directory / 'mtp.safetensors', metadata={'format': 'pt'})
    return directory


def copy_bundled_tokenizer(directory: Path) -> None:
    """Copy the bundled SmolLM2 tokenizer files into a checkpoint directory."""
    tokenizer_source = loader.resolve_model('').directory
    for name in ('tokenizer.json', 'tokenizer_config.json', 'chat_template.jinja',
                 'special_tokens_map.json'):
        if (tokenizer_source / name).is_file():
            shutil.copy(tokenizer_source / name, Path(directory) / name)


def capsule_program_machine(speculative: str = 'off'):
    """
    Return a hypothesis state machine that drives random capsule programs on an engine.

    ``speculative``: the drafts every generation (and its replay) verifies (``lookup``: the
    small word list repeats, so drafts are often accepted and often rejected).

    Set ``Machine.engine`` before running it. Every session and capsule carries the list of
    operations that built it; after each step the touched session is checked against a fresh
    session replaying those operations (journal equal, last logits bitwise equal), the store's
    byte count against the budget, and evictions may only hit unpinned capsules. It opens up
    to ``Machine.max_open`` sessions plus the replay; an engine with fewer slots swaps idle
    sessions out and back in (virtual sessions), which the replay checks as well.
    """
    from hypothesis import strategies as st
    from hypothesis.stateful import (initialize, invariant, precondition, rule,
                                     RuleBasedStateMachine)

    from capsule_ros.runtime.capsule import EventKind
    from capsule_ros.runtime.config import SamplingConfig
    from capsule_ros.runtime.errors import BudgetExceededError

    words = ['go', 'left', 'stop', 'cup', 'door', 'red', 'robot', 'table', 'wait', 'see']
    sampling = SamplingConfig(temperature=0.9, top_k=40, seed=3)

    class CapsuleMachine(RuleBasedStateMachine):
        """Drives one engine; the reference is a replay in a spare slot."""

        engine = None  # set by the test (one engine for all examples: loading is the slow part)
        max_open = 3  # sessions open at once (more than the engine's slots: virtual sessions)

        @initialize()
        def reset(self):
            engine = self.engine
            for session in engine.sessions():
                engine.close_session(session)
            for info in engine.list_capsules():
                engine.store.set_pinned(info.capsule_id, False)
                engine.release(info.capsule_id)
            self.histories = {}   # session id -> operations
            self.capsules = {}    # capsule id -> (operations, pinned)
            self.released = set()
            self.evicted = []
            self.counter = 0
            engine._listeners[:] = [self._on_event]
            self.max_tokens_before_op = engine.max_seq_len - 76  # room for one more operation

        def _on_event(self, event):
            if event.kind is EventKind.EVICTED:
                self.evicted.append(event.capsule_id)

        # -- reference ------------------------------------------------------------------------

        def _replay_matches(self, session_id):
            engine = self.engine
            reference = engine.create_session(sampling=sampling, system_prompt=False)
            try:
                for operation, argument in self.histories[session_id]:
                    if operation == 'append':
                        engine.append(reference, argument)
                    else:
                        engine.generate(reference, argument, speculative=speculative)
                assert engine.session_tokens(reference) == engine.session_tokens(session_id)
                if engine.session_position(reference):
                    assert torch.equal(engine.session_logits(reference),
                                       engine.session_logits(session_id))
            finally:
                engine.close_session(reference)

        def _sync_evictions(self):
            for capsule_id in self.evicted:
                operations, pinned = self.capsules.pop(capsule_id)
                assert not pinned, f'pinned capsule {capsule_id} was evicted'
            self.evicted.clear()

        def _length(self, session_id):
            return self.engine.session_position(session_id)

        # -- rules ----------------------------------------------------------------------------

        @precondition(lambda self: len(self.histories) < self.max_open)
        @rule()
        def create(self):
            session = self.engine.create_session(sampling=sampling, system_prompt=False)
            self.histories[session] = []

        @precondition(lambda self: self.histories)
        @rule(data=st.data(), words=st.lists(st.sampled_from(words), min_size=1, max_size=6))
        def append(self, data, words):
            session = data.draw(st.sampled_from(sorted(self.histories)))
            if self._length(session) > self.max_tokens_before_op:
                return
            text = ' '.join(words)
            self.engine.append(session, text)
            self.histories[session].append(('append', text))
            self._sync_evictions()
            self._replay_matches(session)

        @precondition(lambda self: self.histories)
        @rule(data=st.data(), steps=st.integers(1, 8))
        def generate(self, data, steps):
            session = data.draw(st.sampled_from(sorted(self.histories)))
            if not self._length(session) or self._length(session) > self.max_tokens_before_op:
                return
            self.engine.generate(session, steps, speculative=speculative)
            self.histories[session].append(('generate', steps))
            self._sync_evictions()
            self._replay_matches(session)

        @precondition(lambda self: self.histories)
        @rule(data=st.data(), pin=st.booleans())
        def snapshot(self, data, pin):
            session = data.draw(st.sampled_from(sorted(self.histories)))
            self.counter += 1
            label = f'k{self.counter}'
            try:
                self.engine.snapshot(session, label, pin=pin)
            except BudgetExceededError:
                assert label not in self.engine.store
                return
            self.capsules[label] = (list(self.histories[session]), pin)
            self._sync_evictions()

        def _restore(self, capsule_id, target):
            try:
                result = self.engine.restore(capsule_id, target)
            except BudgetExceededError:
                return  # copy-on-write needed room that pinned capsules hold
            self._sync_evictions()
            self.histories[result.session_id] = list(self.capsules[capsule_id][0])
            self._replay_matches(result.session_id)

        @precondition(lambda self: self.capsules)
        @rule(data=st.data())
        def rollback_capsule(self, data):
            # the capsule's own session (a new one if it was closed and a slot is free)
            capsule_id = data.draw(st.sampled_from(sorted(self.capsules)))
            own = self.engine.capsule(capsule_id).session_id
            if own not in self.histories and len(self.histories) >= self.max_open:
                return
            self._restore(capsule_id, '')

        @precondition(lambda self: self.capsules and self.histories)
        @rule(data=st.data())
        def restore_into_session(self, data):
            capsule_id = data.draw(st.sampled_from(sorted(self.capsules)))
            self._restore(capsule_id, data.draw(st.sampled_from(sorted(self.histories))))

        @precondition(lambda self: self.capsules and len(self.histories) < self.max_open)
        @rule(data=st.data())
        def branch_capsule(self, data):
            capsule_id = data.draw(st.sampled_from(sorted(self.capsules)))
            count = data.draw(st.integers(1, self.max_open - len(self.histories)))
            children = self.engine.branch(capsule_id, count)
            for child in children:
                self.histories[child] = list(self.capsules[capsule_id][0])
            self._sync_evictions()
            self._replay_matches(children[-1])

        @precondition(lambda self: len(self.capsules) >= 2)
        @rule(data=st.data())
        def release(self, data):
            capsule_id = data.draw(st.sampled_from(sorted(self.capsules)))
            self.engine.release(capsule_id)
            del self.capsules[capsule_id]

        @precondition(lambda self: self.capsules)
        @rule(data=st.data())
        def save_and_load(self, data):
            capsule_id = data.draw(st.sampled_from(sorted(self.capsules)))
            self.counter += 1
            name = f'f{self.counter}'
            self.engine.save(capsule_id, name)
            operations = self.capsules[capsule_id][0]
            try:
                self.engine.load(name)
            except BudgetExceededError:
                assert name not in self.engine.store
                return
            self._sync_evictions()
            self.capsules[name] = (list(operations), False)

        @precondition(lambda self: self.histories)
        @rule(data=st.data())
        def close(self, data):
            session = data.draw(st.sampled_from(sorted(self.histories)))
            self.engine.close_session(session)
            del self.histories[session]
            self._sync_evictions()

        # -- invariants -----------------------------------------------------------------------

        @invariant()
        def within_budget_and_accounted(self):
            store = self.engine.store
            assert store.used_bytes <= store.budget_bytes
            every = store.capsules(include_hidden=True)  # swapped-out sessions count too
            counted = sum(capsule.fixed_bytes for capsule in every)
            segments = {segment for capsule in every for segment in capsule.chain}
            counted += sum(segment.num_bytes for segment in segments if segment.data is not None)
            assert counted == store.used_bytes
            for segment in segments:  # every live segment's bytes exist somewhere
                assert segment.data is not None or segment.residences
            assert set(self.capsules) == {capsule.capsule_id for capsule in store.capsules()}

    return CapsuleMachine


def run_capsule_programs(engine, max_examples: int, steps: int, max_open: int = 3,
                         speculative: str = 'off') -> None:
    """Run ``max_examples`` random capsule programs of ``steps`` steps on ``engine``."""
    from hypothesis import HealthCheck, settings

    machine = capsule_program_machine(speculative)
    machine.engine = engine
    machine.max_open = max_open
    engine.config.capsules.directory().mkdir(parents=True, exist_ok=True)
    machine_test = machine.TestCase
    machine_test.settings = settings(
        max_examples=max_examples, stateful_step_count=steps, deadline=None,
        derandomize=True, suppress_health_check=list(HealthCheck))
    machine_test('runTest').runTest()
