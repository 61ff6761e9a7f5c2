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
One source of parameter defaults: the frozen config dataclasses.

The node's parameters (names, types, defaults) derive from them, config/policy.yaml equals
them, and the ranges the parameter descriptors advertise are the ones config.py enforces.
"""

import ast
from dataclasses import fields
import pathlib

from capsule_ros.ros.parameters import AUTOSTART_PARAMETER
from capsule_ros.ros.parameters import PARAMETER_DEFAULTS
from capsule_ros.ros.parameters import parameter_descriptor
from capsule_ros.ros.parameters import parameter_names
from capsule_ros.ros.parameters import PARAMETER_RANGES
from capsule_ros.ros.parameters import set_refusal
from capsule_ros.runtime.config import BACKEND_KINDS
from capsule_ros.runtime.config import BackendConfig
from capsule_ros.runtime.config import PolicyConfig
from capsule_ros.runtime.errors import InvalidArgumentError
import pytest
import yaml

# The source tree's file (the installed copy is the same file; test_node_smoke reads that one).
PARAMS_FILE = pathlib.Path(__file__).resolve().parents[2] / 'config' / 'policy.yaml'
FLOAT_STEP = 1e-9


def dataclass_defaults():
    """Return ``{group: {name: default}}`` of a default-constructed PolicyConfig."""
    config = PolicyConfig()
    return {
        group.name: {item.name: getattr(getattr(config, group.name), item.name)
                     for item in fields(group.default_factory)}
        for group in fields(PolicyConfig)
    }


def test_params_file_equals_the_dataclass_defaults():
    """config/policy.yaml sets every parameter to its dataclass default, with its type."""
    parameters = yaml.safe_load(PARAMS_FILE.read_text())['/**']['ros__parameters']
    defaults = dataclass_defaults()
    assert parameters == defaults
    for group, values in defaults.items():
        for name, default in values.items():
            assert type(parameters[group][name]) is type(default), f'{group}.{name}'


def test_declared_defaults_derive_from_the_dataclasses():
    """The node declares exactly the dataclass fields, with their defaults and types."""
    assert PARAMETER_DEFAULTS == dataclass_defaults()
    assert parameter_names() == [f'{group}.{name}' for group, values in
                                 dataclass_defaults().items() for name in values]


def test_readme_defaults_match():
    """The README's Parameters table names the defaults the code has (numbers and flags)."""
    readme = (PARAMS_FILE.parents[1] / 'README.md').read_text()
    for group, values in dataclass_defaults().items():
        for name, default in values.items():
            row = next((line for line in readme.splitlines()
                        if line.startswith(f'| `{group}.{name}` |')), None)
            assert row is not None, f'{group}.{name} is missing from the README table'
            written = "''" if default == '' else str(default)
            assert row.startswith(f'| `{group}.{name}` | `{written}` |'), row


@pytest.mark.parametrize('name', [*parameter_names(), AUTOSTART_PARAMETER])
def test_every_parameter_is_described(name):
    """Each descriptor has a description; configure-time ones say so; autostart is read-only."""
    descriptor = parameter_descriptor(name)
    assert descriptor.description
    if name == AUTOSTART_PARAMETER:
        assert descriptor.read_only
    else:
        assert not descriptor.read_only and 'configure' in descriptor.description


def accepted(name, value):
    """Return whether config.py accepts ``value`` for parameter ``name``."""
    group, field = name.split('.')
    try:
        PolicyConfig.from_dict({group: {field: value}})
    except InvalidArgumentError as error:
        assert name in str(error)  # the message names the parameter
        return False
    return True


@pytest.mark.parametrize('name', sorted(PARAMETER_RANGES))
def test_descriptor_ranges_are_the_config_ranges(name):
    """Just inside a descriptor's range config.py accepts, just outside it refuses."""
    low, high = PARAMETER_RANGES[name]
    step = 1 if isinstance(low, int) else FLOAT_STEP
    assert accepted(name, high) and not accepted(name, high + step)
    assert accepted(name, low + (0 if isinstance(low, int) else step))
    assert not accepted(name, low - step)
    descriptor = parameter_descriptor(name)
    (advertised,) = descriptor.integer_range or descriptor.floating_point_range
    assert (advertised.from_value, advertised.to_value) == (low, high)


def test_set_refusal_names_the_reason():
    """Unconfigured: invalid values are refused by config.py's check; configured: all are."""
    assert set_refusal('engine.max_seq_len', 4096, configured_state='') == ''
    assert 'engine.max_seq_len' in set_refusal('engine.max_seq_len', 5, configured_state='')
    assert 'generation.top_p' in set_refusal('generation.top_p', 0.0, configured_state='')
    reason = set_refusal('engine.max_seq_len', 4096, configured_state='active')
    for word in ('engine.max_seq_len', 'applied at configure', 'active', 'deactivate',
                 'cleanup', 'configure'):
        assert word in reason, reason
    assert set_refusal('use_sim_time', True, configured_state='active') == ''  # not ours


def test_the_launch_file_offers_only_the_backends_config_accepts():
    """backend:= in policy.launch.py lists exactly BACKEND_KINDS (no promise configure breaks)."""
    launch_file = PARAMS_FILE.parents[1] / 'launch' / 'policy.launch.py'
    tree = ast.parse(launch_file.read_text())
    offered = [ast.literal_eval(keyword.value)
               for call in ast.walk(tree) if isinstance(call, ast.Call)
               and call.args and isinstance(call.args[0], ast.Constant)
               and call.args[0].value == 'backend'
               for keyword in call.keywords if keyword.arg == 'choices']
    assert offered == [list(BACKEND_KINDS)]
    for kind in offered[0]:
        assert BackendConfig(kind=kind).kind == kind
