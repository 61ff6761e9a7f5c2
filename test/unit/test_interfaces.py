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
"""Interface contracts that no DDS is needed to check: named constants and their values."""

from capsule_ros import action
from capsule_ros import msg
from capsule_ros import srv
import pytest

ERROR_CODES = {
    'OK': 0, 'UNKNOWN_CAPSULE': 1, 'UNKNOWN_SESSION': 2, 'FINGERPRINT_MISMATCH': 3,
    'BUDGET_EXCEEDED': 4, 'INVALID_ARGUMENT': 5, 'BUSY': 6, 'IO_ERROR': 7, 'INTERNAL': 8,
    'NOT_AVAILABLE': 9, 'CORRUPT_FILE': 10,
}
RESPONSES = [
    srv.Snapshot.Response, srv.Restore.Response, srv.Branch.Response,
    srv.ListCapsules.Response, srv.ReleaseCapsule.Response, srv.SaveCapsule.Response,
    srv.LoadCapsule.Response, srv.Append.Response, srv.CloseSession.Response,
    action.Generate.Result,
]


def test_every_service_of_the_package_is_checked():
    """A new .srv cannot slip past the error-scheme check below."""
    services = {getattr(srv, name).Response for name in dir(srv)
                if not name.startswith('_') and hasattr(getattr(srv, name), 'Response')}
    assert services == {response for response in RESPONSES
                        if response.__module__.startswith('capsule_ros.srv')}


@pytest.mark.parametrize('response_type', RESPONSES, ids=lambda t: t.__module__ + t.__name__)
def test_every_response_carries_the_error_scheme(response_type):
    """Each carries success, error_code and message, with the same named codes."""
    fields = response_type.get_fields_and_field_types()
    assert fields['success'] == 'boolean'
    assert fields['error_code'] == 'uint8'
    assert fields['message'] == 'string'
    for name, value in ERROR_CODES.items():
        assert getattr(response_type, name) == value, name


def test_runtime_error_codes_name_interface_constants():
    """Each runtime error's ``code`` is a constant of the interfaces (when the runtime has it)."""
    errors = pytest.importorskip('capsule_ros.runtime.errors', reason='runtime not installed')
    codes = {
        value.code for value in vars(errors).values()
        if isinstance(value, type) and issubclass(value, errors.CapsuleRosError)}
    assert codes <= ERROR_CODES.keys(), codes - ERROR_CODES.keys()


def test_named_constants():
    """Tiers, event kinds, sentinels, roles and stop reasons have their documented values."""
    assert (msg.CapsuleInfo.TIER_SLOT, msg.CapsuleInfo.TIER_HOST,
            msg.CapsuleInfo.TIER_DISK) == (0, 1, 2)
    kinds = ['CREATED', 'RESTORED', 'BRANCHED', 'EVICTED', 'RELEASED', 'SAVED', 'LOADED']
    assert [getattr(msg.CapsuleEvent, kind) for kind in kinds] == list(range(len(kinds)))
    assert msg.SamplingParams.SEED_UNSET == -1
    goal, result = action.Generate.Goal, action.Generate.Result
    assert (goal.ROLE_USER, goal.ROLE_SYSTEM, goal.ROLE_OBSERVATION, goal.ROLE_RAW) == (
        0, 1, 2, 3)
    assert (result.STOP_EOS, result.STOP_STRING, result.STOP_MAX_TOKENS,
            result.STOP_CANCELED, result.STOP_ERROR, result.STOP_CONTEXT_FULL) == (
        0, 1, 2, 3, 4, 5)
    append = srv.Append.Request
    assert (append.ROLE_USER, append.ROLE_SYSTEM, append.ROLE_OBSERVATION,
            append.ROLE_RAW) == (goal.ROLE_USER, goal.ROLE_SYSTEM, goal.ROLE_OBSERVATION,
                                 goal.ROLE_RAW)


def test_sampling_defaults_mean_greedy_and_off():
    """A default SamplingParams is greedy with every filter off and the seed unset."""
    sampling = msg.SamplingParams()
    assert sampling.temperature == 0.0
    assert sampling.top_k == 0
    assert sampling.top_p == 1.0
    assert sampling.seed == msg.SamplingParams.SEED_UNSET
    assert action.Generate.Goal().sampling == sampling
