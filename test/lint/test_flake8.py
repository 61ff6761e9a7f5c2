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
"""ament_flake8 (99 columns, single quotes, google import order) passes on the package."""

from ament_flake8.main import main_with_errors
from lint_paths import lint_paths


def test_flake8():
    """No flake8 error in the package's Python code."""
    status, errors = main_with_errors(argv=lint_paths())
    assert status == 0, f'{len(errors)} flake8 error(s):\n' + '\n'.join(errors)
