"""The installed Python bindings match the .msg/.srv definitions in this package (no stale build)."""
import importlib
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1]
DEFINITIONS = sorted(PKG.glob('msg/*.msg')) + sorted(PKG.glob('srv/*.srv'))
FIELD = re.compile(r'^\s*([A-Za-z0-9_/]+(?:\[\d*\])?)\s+([a-z][a-z0-9_]*)\s*(?:#.*)?$')


def _fields(lines):
    return [m.group(2) for m in map(FIELD.match, lines) if m]


@pytest.mark.parametrize('path', DEFINITIONS, ids=lambda p: p.name)
def test_generated_type_matches_definition(path):
    module = importlib.import_module(f'async_ttt_ros_interfaces.{path.parent.name}')
    cls = getattr(module, path.stem)
    text = path.read_text().splitlines()
    if path.suffix == '.srv':
        cut = text.index('---')
        parts = [(cls.Request, text[:cut]), (cls.Response, text[cut + 1:])]
    else:
        parts = [(cls, text)]
    for generated, lines in parts:
        assert list(generated.get_fields_and_field_types()) == _fields(lines), generated


def test_every_definition_is_generated():
    cmake = (PKG / 'CMakeLists.txt').read_text()
    for path in DEFINITIONS:
        assert f'"{path.parent.name}/{path.name}"' in cmake, f'{path.name} missing in CMakeLists.txt'
