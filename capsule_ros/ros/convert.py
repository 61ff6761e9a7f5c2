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
Conversions at the ROS boundary: runtime records to messages, runtime errors to error codes.

This is the one place where a runtime error's ``code`` becomes an interface ``error_code``;
nothing else in the ROS layer inspects exception types.
"""

from builtin_interfaces.msg import Time
from capsule_ros.action import Generate
from capsule_ros.msg import CapsuleEvent
from capsule_ros.msg import CapsuleInfo
from capsule_ros.runtime.capsule import EventKind
from capsule_ros.runtime.capsule import Tier
from capsule_ros.runtime.chat import Role
from capsule_ros.runtime.engine import StopReason
from capsule_ros.runtime.errors import InvalidArgumentError

# Runtime error code (``CapsuleRosError.code``) -> name of the interface constant. Every
# response type carries the same constants, so the name is looked up on the response.
ERROR_CODE_NAMES = (
    'OK', 'UNKNOWN_CAPSULE', 'UNKNOWN_SESSION', 'FINGERPRINT_MISMATCH', 'BUDGET_EXCEEDED',
    'INVALID_ARGUMENT', 'BUSY', 'IO_ERROR', 'INTERNAL', 'NOT_AVAILABLE', 'CORRUPT_FILE',
)

TIERS = {
    Tier.SLOT: CapsuleInfo.TIER_SLOT,
    Tier.HOST: CapsuleInfo.TIER_HOST,
    Tier.DISK: CapsuleInfo.TIER_DISK,
}

EVENT_KINDS = {
    EventKind.CREATED: CapsuleEvent.CREATED,
    EventKind.RESTORED: CapsuleEvent.RESTORED,
    EventKind.BRANCHED: CapsuleEvent.BRANCHED,
    EventKind.EVICTED: CapsuleEvent.EVICTED,
    EventKind.RELEASED: CapsuleEvent.RELEASED,
    EventKind.SAVED: CapsuleEvent.SAVED,
    EventKind.LOADED: CapsuleEvent.LOADED,
}

# Generate.Goal.ROLE_* (and Append.Request.ROLE_*, same values) -> runtime role.
ROLES = {
    Generate.Goal.ROLE_USER: Role.USER,
    Generate.Goal.ROLE_SYSTEM: Role.SYSTEM,
    Generate.Goal.ROLE_OBSERVATION: Role.OBSERVATION,
    Generate.Goal.ROLE_RAW: Role.RAW,
}

STOP_REASONS = {
    StopReason.EOS: Generate.Result.STOP_EOS,
    StopReason.STOP_STRING: Generate.Result.STOP_STRING,
    StopReason.MAX_TOKENS: Generate.Result.STOP_MAX_TOKENS,
    StopReason.CANCELED: Generate.Result.STOP_CANCELED,
    # The session ran out of positions: generation ended cleanly, like max_new_tokens.
    StopReason.CONTEXT_FULL: Generate.Result.STOP_CONTEXT_FULL,
}


def error_code_of(error):
    """Return the interface error-code name for an exception (``INTERNAL`` if unexpected)."""
    code = getattr(error, 'code', 'INTERNAL')
    return code if code in ERROR_CODE_NAMES else 'INTERNAL'


def fill_error(response, error):
    """Set ``success``, ``error_code`` and ``message`` of ``response`` from an exception."""
    name = error_code_of(error)
    response.success = False
    response.error_code = getattr(response, name)
    message = str(error) or type(error).__name__
    response.message = message if name != 'INTERNAL' or hasattr(error, 'code') else (
        f'{type(error).__name__}: {message}')
    return response


def fill_ok(response):
    """Mark ``response`` successful."""
    response.success = True
    response.error_code = response.OK
    response.message = ''
    return response


def to_time(unix_s):
    """Convert seconds since the epoch to ``builtin_interfaces/Time``."""
    seconds = int(unix_s)
    return Time(sec=seconds, nanosec=int((unix_s - seconds) * 1e9))


def capsule_message(info):
    """Convert a runtime ``CapsuleInfo`` to the ``CapsuleInfo`` message."""
    return CapsuleInfo(
        capsule_id=info.capsule_id,
        parent_id=info.parent_id,
        session_id=info.session_id,
        label=info.label,
        num_tokens=info.num_tokens,
        kv_bytes=info.kv_bytes,
        state_bytes=info.state_bytes,
        conv_bytes=info.conv_bytes,
        recurrent_bytes=info.recurrent_bytes,
        mtp_bytes=info.mtp_bytes,
        meta_bytes=info.meta_bytes,
        shared_bytes=info.shared_bytes,
        tier=TIERS[Tier(info.tier)],
        pinned=info.pinned,
        resident_in_slot=info.resident_in_slot,
        created=to_time(info.created),
        model_fingerprint=info.fingerprint,
        children=list(info.children),
    )


def event_message(event, stamp):
    """Convert a runtime ``CapsuleEvent`` to the message, stamped with ``stamp``."""
    return CapsuleEvent(
        kind=EVENT_KINDS[EventKind(event.kind)],
        capsule_id=event.capsule_id,
        session_id=event.session_id,
        detail=event.detail,
        stamp=stamp,
        latency_ms=event.latency_s * 1e3,
    )


def role_of(role):
    """Return the runtime role of a ``ROLE_*`` value; ``InvalidArgumentError`` if unknown."""
    if role not in ROLES:
        raise InvalidArgumentError(
            f'role {role} is not one of ROLE_USER=0, ROLE_SYSTEM=1, ROLE_OBSERVATION=2, '
            f'ROLE_RAW=3')
    return ROLES[role]
