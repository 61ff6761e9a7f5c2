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
Chat formatting for incremental sessions, derived from the model's own chat template.

A session is appended to message by message, so the template is rendered piecewise: the text a
message adds is the difference between renderings with and without it. The pieces are computed
once per tokenizer.
"""

import enum

from capsule_ros.runtime.errors import InvalidArgumentError

_PROBE_SYSTEM = 'probe system'
_PROBE_USER = 'probe user'
_PROBE_REPLY = 'probe reply'


class Role(str, enum.Enum):
    """Who speaks a message; ``raw`` bypasses the template."""

    USER = 'user'
    SYSTEM = 'system'
    OBSERVATION = 'observation'
    RAW = 'raw'


class TurnState(enum.IntEnum):
    """Where the journal stands in the chat; stored in the session's meta state."""

    IDLE = 0              # empty, or the last message is complete
    ASSISTANT_OPEN = 1    # an assistant reply was generated and not closed
    ASSISTANT_ENDED = 2   # the reply ended with the end-of-turn token, its trailer is pending


class ChatFormatter:
    """Turns (role, text) into the exact text the chat template would put in the journal."""

    def __init__(self, tokenizer):
        """Derive header/trailer pieces from ``tokenizer.chat_template``."""
        self.tokenizer = tokenizer
        self.has_template = bool(getattr(tokenizer, 'chat_template', None))
        if not self.has_template:
            return
        system = {'role': 'system', 'content': _PROBE_SYSTEM}
        user = {'role': 'user', 'content': _PROBE_USER}
        reply = {'role': 'assistant', 'content': _PROBE_REPLY}
        base = self._render([system, user])
        with_prompt = self._render([system, user], add_generation_prompt=True)
        with_reply = self._render([system, user, reply])
        self.assistant_header = with_prompt[len(base):]
        self.assistant_trailer = with_reply[with_reply.index(_PROBE_REPLY) + len(_PROBE_REPLY):]
        eos = tokenizer.eos_token or ''
        self.trailer_after_eos = (self.assistant_trailer[len(eos):]
                                  if eos and self.assistant_trailer.startswith(eos)
                                  else self.assistant_trailer)

    def _render(self, messages, add_generation_prompt=False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def message_text(self, role: Role, text: str, is_first: bool, turn: TurnState) -> str:
        """Text a message adds to a journal that is empty (``is_first``) or in ``turn``."""
        if role is Role.RAW or not self.has_template:
            return text
        closing = {TurnState.IDLE: '', TurnState.ASSISTANT_OPEN: self.assistant_trailer,
                   TurnState.ASSISTANT_ENDED: self.trailer_after_eos}[turn]
        template_role = 'user' if role is Role.OBSERVATION else role.value
        content = f'Observation: {text}' if role is Role.OBSERVATION else text
        message = {'role': template_role, 'content': content}
        if is_first:
            return closing + self._render([message])
        probe = {'role': 'system', 'content': _PROBE_SYSTEM}
        before = self._render([probe])
        after = self._render([probe, message])
        if not after.startswith(before):
            raise InvalidArgumentError('the chat template does not render messages incrementally')
        return closing + after[len(before):]

    def reply_header(self, turn: TurnState) -> str:
        """Text that opens an assistant reply (empty if one is already open)."""
        if not self.has_template or turn is TurnState.ASSISTANT_OPEN:
            return ''
        return self.assistant_header
