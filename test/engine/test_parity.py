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
"""Numeric parity of the engine with transformers on the real SmolLM2 weights."""

from conftest import BRIEFING
import torch

FP32_TOLERANCE = 1e-3


def chat_prompt_tokens(engine, count=256):
    """Return a chat-formatted prompt of exactly ``count`` tokens (truncated briefing + header)."""
    text = engine.chat.message_text
    from capsule_ros.runtime.chat import Role, TurnState
    tokens = engine.tokenize(text(Role.USER, BRIEFING * 3, True, TurnState.IDLE))
    header = engine.tokenize(engine.chat.assistant_header)
    return tokens[:count - len(header)] + header


def test_logits_and_greedy_tokens_match_transformers(real_engine, reference_model):
    """256-token chat prompt + 32 greedy steps: max |diff| <= 1e-3, identical tokens."""
    engine = real_engine
    prompt = chat_prompt_tokens(engine)
    assert len(prompt) == 256
    session = engine.create_session()
    engine.append(session, tokens=prompt)
    worst = 0.0
    with torch.inference_mode():
        output = reference_model(torch.tensor([prompt]), use_cache=True)
        cache = output.past_key_values
        reference_logits = output.logits[0, -1]
        for _ in range(32):
            ours = engine.session_logits(session)
            worst = max(worst, float((ours - reference_logits).abs().max()))
            reference_token = int(reference_logits.argmax())
            token = engine.generate(session, 1, reply=False).token_ids[0]
            assert token == reference_token
            output = reference_model(torch.tensor([[token]]), past_key_values=cache,
                                     use_cache=True)
            cache = output.past_key_values
            reference_logits = output.logits[0, -1]
    print(f'max |logit difference| over 33 positions: {worst:.2e}')
    assert worst <= FP32_TOLERANCE
    engine.close_session(session)


def test_incremental_decode_equals_one_shot_prefill(real_engine):
    """Tokens generated one by one, then prefilled at once, give the same logits."""
    engine = real_engine
    session = engine.create_session()
    engine.append(session, BRIEFING)
    engine.generate(session, 24)
    journal = engine.session_tokens(session)
    incremental = engine.session_logits(session)
    one_shot = engine.create_session()
    engine.append(one_shot, tokens=journal)
    difference = float((engine.session_logits(one_shot) - incremental).abs().max())
    assert difference <= FP32_TOLERANCE
    assert int(incremental.argmax()) == int(engine.session_logits(one_shot).argmax())
    engine.close_session(session)
    engine.close_session(one_shot)


def test_chunked_prefill_at_unaligned_boundaries_equals_unchunked(real_engine):
    """Prefill cut at 1, 37, 100 and 211 tokens equals one prefill of the same tokens."""
    engine = real_engine
    tokens = engine.tokenize(BRIEFING * 2)[:300]
    whole = engine.create_session()
    engine.append(whole, tokens=tokens)
    pieces = engine.create_session()
    for start, end in ((0, 1), (1, 37), (37, 100), (100, 211), (211, 300)):
        engine.append(pieces, tokens=tokens[start:end])
    difference = float((engine.session_logits(whole) - engine.session_logits(pieces)).abs().max())
    assert difference <= FP32_TOLERANCE
    assert engine.generate(whole, 8).token_ids == engine.generate(pieces, 8).token_ids
    engine.close_session(whole)
    engine.close_session(pieces)


def test_greedy_output_is_sensible_english(real_engine):
    """The real weights answer a chat question with words, ending on the end-of-turn token."""
    engine = real_engine
    session = engine.create_session()
    engine.append(session, 'What is the capital of France? Answer in one word.')
    result = engine.generate(session, 16)
    assert 'Paris' in result.text
    engine.close_session(session)


def test_onnxruntime_backend_matches_torch_over_prefill_and_64_decode_steps(
        real_engine, onnxruntime_engine):
    """The exported graph on ONNX Runtime: greedy tokens identical, logits within 1e-3 (fp32)."""
    results = []
    for engine in (real_engine, onnxruntime_engine):
        session = engine.create_session(system_prompt=False)
        engine.append(session, BRIEFING, role='raw')  # plain text: no reply, no EOS to stop at
        prefill_logits = engine.session_logits(session)
        tokens = engine.generate(session, 64, reply=False).token_ids
        results.append((prefill_logits, tokens, engine.session_logits(session)))
        engine.close_session(session)
    (torch_prefill, torch_tokens, torch_last), (ort_prefill, ort_tokens, ort_last) = results
    assert len(ort_tokens) == 64 and ort_tokens == torch_tokens
    torch.testing.assert_close(ort_prefill, torch_prefill, rtol=0, atol=1e-3)
    torch.testing.assert_close(ort_last, torch_last, rtol=0, atol=1e-3)
