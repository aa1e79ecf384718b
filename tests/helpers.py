"""Shared test helpers: run the real CLI, write safetensors files by hand."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def run_prewarm(
    *args: str | Path, check: bool = False, timeout: float = 300, env: dict[str, str] | None = None, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """The real `prewarm` CLI in a subprocess, as a user would run it."""
    env = {**(os.environ if env is None else env), "PYTHONPATH": str(ROOT)}
    env.pop("PREWARM_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "prewarm", *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env, **kwargs
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"prewarm {args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def assert_clean_failure(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    """A user error: the given exit code, one `Error:` line naming the problem, no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def write_raw_safetensors(path: Path, header: dict[str, Any] | bytes, data: bytes, header_len: int | None = None) -> Path:
    """A safetensors file from a header written by hand (which may be deliberately wrong)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())
