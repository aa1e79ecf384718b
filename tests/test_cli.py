from __future__ import annotations

import ast
import subprocess
import sys
import threading

import pytest

from prewarm.progress import PlainProgress
from tests.helpers import ROOT, run_prewarm


def test_plain_progress_prints_a_line_per_tenth_from_many_threads(capsys: pytest.CaptureFixture[str]) -> None:
    progress = PlainProgress(quiet_seconds=0)
    progress.start("hashing", 1000)
    threads = [threading.Thread(target=lambda: [progress.advance(1) for _ in range(250)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[1].split("%")[0].strip() for line in lines] == [str(p) for p in range(10, 101, 10)]
    assert lines[-1].startswith("hashing: 100% (1.00 kB of 1.00 kB")


def test_core_commands_do_not_import_torch_or_vllm() -> None:
    code = (
        "import sys, prewarm.cli, prewarm.reshard, prewarm.verify, prewarm.manifest, prewarm.daemon, prewarm.client; "
        "sys.exit(sorted({'torch', 'vllm', 'transformers'} & set(sys.modules)) or 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "reshard" in run_prewarm("--help", check=True).stdout


def test_unknown_option_is_a_usage_error() -> None:
    proc = run_prewarm("reshard", "--frobnicate")
    assert proc.returncode == 2 and "No such option '--frobnicate'" in proc.stderr


def test_version() -> None:
    assert run_prewarm("--version", check=True).stdout.startswith("prewarm, version ")


def test_every_error_prewarm_builds_says_what_to_do_next() -> None:
    """Every PrewarmError constructed anywhere in prewarm/ carries a hint (the CLI's fallback per
    exit code is for what slips through, not a plan)."""
    import prewarm.errors
    from prewarm.errors import PrewarmError

    classes = {n for n, value in vars(prewarm.errors).items() if isinstance(value, type) and issubclass(value, PrewarmError)}
    calls = []
    for path in sorted((ROOT / "prewarm").glob("*.py")):
        tree = ast.parse(path.read_text())
        subclasses = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
        local = {n.name for n in subclasses if any(getattr(b, "id", "") in classes for b in n.bases)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in classes | local:
                calls.append((path.name, node))
    assert len(calls) > 50
    missing = [f"{name}:{c.lineno}: {ast.unparse(c)[:100]}" for name, c in calls if not any(k.arg == "hint" for k in c.keywords)]
    assert not missing, "\n".join(missing)


def test_the_example_config_loads_with_every_setting() -> None:
    import dataclasses

    from prewarm.config import DaemonSettings, load_settings

    path = ROOT / "systemd" / "qwen-prewarm.toml"
    settings = load_settings(path, {})
    assert settings.model == "Qwen/Qwen2.5-7B-Instruct" and settings.socket_mode == 0o660
    assert settings.engine_args == ("--enable-prefix-caching", "--gpu-memory-utilization", "0.9")
    text = path.read_text()
    missing = [f.name for f in dataclasses.fields(DaemonSettings) if f.name not in text and f.name != "engine_args"]
    assert not missing, f"settings the example does not document: {missing}"
