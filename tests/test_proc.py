"""A llama.cpp tool that fails surfaces its command, exit code and the tail of what it printed."""

from __future__ import annotations

import pickle

import pytest

from quantkit.errors import ToolError
from quantkit.proc import run_tool
from quantkit.toolchain import ensure_toolchain


def test_failing_tool_raises_with_command_and_output_tail(tmp_path):
    quantize = ensure_toolchain().binary("llama-quantize")
    missing = tmp_path / "missing.gguf"
    with pytest.raises(ToolError) as info:
        run_tool([quantize, missing, tmp_path / "out.gguf", "Q4_K_M"])
    err = info.value
    assert err.returncode != 0
    assert err.command == [str(quantize), str(missing), str(tmp_path / "out.gguf"), "Q4_K_M"]
    assert str(missing) in err.output_tail  # the tool's own complaint names the file
    text = str(err)
    assert text.startswith(f"{quantize} exited with code {err.returncode}\n  command: {quantize} {missing}")
    assert not (tmp_path / "out.gguf").exists()
    # Prefect moves exceptions between processes.
    assert str(pickle.loads(pickle.dumps(err))) == text
