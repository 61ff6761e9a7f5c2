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
"""package.xml validates, every interface file is generated, every Python file is licensed."""

import re

from catkin_pkg.package import parse_package
from lint_paths import python_files
from lint_paths import SOURCE_ROOT

LICENSE_LINE = 'Licensed under the Apache License, Version 2.0'


def test_package_xml_validates():
    """catkin_pkg parses and validates package.xml (format 3, ament_cmake, interfaces)."""
    package = parse_package(str(SOURCE_ROOT))
    package.validate()
    assert package.name == 'capsule_ros'
    assert package.package_format == 3
    assert package.get_build_type() == 'ament_cmake'
    assert package.licenses == ['Apache-2.0']
    assert 'rosidl_interface_packages' in [group.name for group in package.member_of_groups]


def test_every_interface_file_is_generated():
    """Every msg/srv/action file is listed in CMakeLists.txt, and no listed one is missing."""
    cmake = (SOURCE_ROOT / 'CMakeLists.txt').read_text()
    listed = set(re.findall(r'"((?:msg|srv|action)/\w+\.(?:msg|srv|action))"', cmake))
    present = {
        str(path.relative_to(SOURCE_ROOT))
        for folder in ('msg', 'srv', 'action') for path in (SOURCE_ROOT / folder).iterdir()}
    assert listed == present


def test_every_interface_field_is_commented():
    """Every field and constant line of every interface file carries a comment."""
    undocumented = []
    for folder in ('msg', 'srv', 'action'):
        for path in sorted((SOURCE_ROOT / folder).iterdir()):
            lines = path.read_text().splitlines()
            for number, line in enumerate(lines, start=1):
                stripped = line.strip()
                if not stripped or stripped.startswith('#') or stripped == '---':
                    continue
                previous = lines[number - 2].strip() if number > 1 else ''
                if '#' not in stripped and not previous.startswith('#'):
                    undocumented.append(f'{path.name}:{number}: {stripped}')
    assert not undocumented, '\n'.join(undocumented)


def test_every_python_file_has_the_license_header():
    """Apache-2.0 header in every non-empty Python file (empty __init__.py files excepted)."""
    missing = [
        str(path.relative_to(SOURCE_ROOT)) for path in python_files()
        if path.stat().st_size and LICENSE_LINE not in path.read_text()[:1000]]
    assert not missing, missing
