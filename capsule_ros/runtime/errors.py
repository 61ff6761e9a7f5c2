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
"""Typed runtime errors; the ROS layer maps each ``code`` to a service ``error_code``."""

import re

PLAIN_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9._-]{0,127}')


class CapsuleRosError(Exception):
    """Base of every error the runtime raises on purpose; ``code`` names the error kind."""

    code = 'INTERNAL'


class InvalidArgumentError(CapsuleRosError, ValueError):
    """A request value is out of range or malformed; nothing was changed."""

    code = 'INVALID_ARGUMENT'


class UnknownSessionError(CapsuleRosError, KeyError):
    """The session id does not exist (never created, or closed)."""

    code = 'UNKNOWN_SESSION'

    def __str__(self):
        """Keep the message readable (KeyError would quote it)."""
        return str(self.args[0]) if self.args else ''


class UnknownCapsuleError(CapsuleRosError, KeyError):
    """The capsule id does not exist (never created, released or evicted)."""

    code = 'UNKNOWN_CAPSULE'

    def __str__(self):
        """Keep the message readable (KeyError would quote it)."""
        return str(self.args[0]) if self.args else ''


class FingerprintMismatchError(CapsuleRosError):
    """A capsule was made by a different model, dtype, backend or state layout."""

    code = 'FINGERPRINT_MISMATCH'


class BudgetExceededError(CapsuleRosError):
    """The capsule store cannot hold the bytes without breaking its budget."""

    code = 'BUDGET_EXCEEDED'


class SessionBusyError(CapsuleRosError):
    """Another operation (usually a generation) holds the session."""

    code = 'BUSY'


class CapsuleIOError(CapsuleRosError, OSError):
    """Reading or writing the capsule directory failed."""

    code = 'IO_ERROR'


class CorruptCapsuleError(CapsuleRosError):
    """A capsule file is truncated, altered or not a capsule file at all."""

    code = 'CORRUPT_FILE'


class ContextFullError(InvalidArgumentError):
    """The tokens would not fit in the session's ``max_seq_len``."""

    code = 'INVALID_ARGUMENT'


def check_plain_name(name: str, what: str) -> str:
    """Ids and names travel into file names and messages: keep them short and plain."""
    if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name) or '..' in name:
        raise InvalidArgumentError(
            f'{what} {name!r} must be 1-128 characters of letters, digits, ".", "_" or "-", '
            f'start with a letter or digit, and not contain ".." or "/"')
    return name


class PrefillCanceledError(CapsuleRosError):
    """A prefill stopped between two chunks on cancel; the session keeps what was prefilled."""

    def __init__(self, session_id: str, num_tokens: int, total_tokens: int):
        """Record how far the prefill got: ``num_tokens`` of ``total_tokens``."""
        super().__init__(
            f'prefill of session {session_id!r} canceled after {num_tokens} of {total_tokens} '
            f'tokens; the session holds those (restore a capsule to undo them)')
        self.num_tokens = num_tokens
        self.total_tokens = total_tokens
