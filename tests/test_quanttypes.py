"""quantkit's type table must match what the pinned llama-quantize accepts."""

from __future__ import annotations

import re
import subprocess

import pytest

from quantkit.quanttypes import ALIASES, QUANT_TYPES
from quantkit.toolchain import ensure_toolchain


@pytest.fixture(scope="module")
def help_text() -> str:
    tc = ensure_toolchain()
    out = subprocess.run([str(tc.binary("llama-quantize")), "--help"], capture_output=True, text=True)
    return out.stdout + out.stderr


def test_type_table_matches_llama_quantize(help_text):
    by_name = {name: int(num) for num, name in re.findall(r"^\s+(\d+)\s+or\s+(\w+)\s*:", help_text, flags=re.M)}
    assert set(by_name) == set(QUANT_TYPES) | set(ALIASES)
    for name, qt in QUANT_TYPES.items():
        assert by_name[name] == qt.ftype, name
