"""Property tests: whatever a user or a damaged file feeds the CLI, it ends with an exit code from
the README's table and one `Error:` + `hint:` pair, never a traceback.

These run the CLI in-process (click's CliRunner) so hypothesis can try hundreds of inputs; the
end-to-end behaviour is covered by the subprocess tests elsewhere."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prewarm.checkpoint import MANIFEST_NAME
from prewarm.cli import main
from prewarm.errors import ExitCode
from prewarm.verify import RECORD_NAME
from tests.helpers import write_raw_safetensors

EXIT_CODES = {int(code) for code in ExitCode}
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True)
def no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREWARM_DEBUG", raising=False)


def invoke(*args: str | Path) -> Result:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    assert "Traceback" not in result.stderr
    assert result.exit_code in EXIT_CODES, (result.exit_code, result.stderr)
    if result.exit_code not in (0, 1):
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1, result.stderr
        if result.exit_code != ExitCode.USAGE:  # click's own usage errors point to --help instead
            assert "  hint: " in result.stderr, result.stderr
    return result


@pytest.fixture(scope="module")
def served(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("served") / "served"
    assert CliRunner().invoke(main, ["-q", "reshard", str(tiny_model), str(out)]).exit_code == 0
    return out


sizes = st.one_of(
    st.text(max_size=30),
    st.integers(min_value=-(2**80), max_value=2**200).map(str),
    st.builds(lambda n, u: f"{n}{u}", st.integers(0, 10**40), st.sampled_from(["", "B", "KB", "MB", "GiB", "TB", "XB"])),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
)


@SETTINGS
@given(size=sizes)
def test_any_size_option_is_a_clean_outcome(size: str, served: Path, tmp_path: Path) -> None:
    invoke("-q", "warm", served, "--budget", size)
    result = invoke("-q", "reshard", served, tmp_path / "never", "--max-shard-size", size)
    if result.exit_code != 0:
        assert not (tmp_path / "never").exists()
    else:
        shutil.rmtree(tmp_path / "never")


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=8)),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def _manifest_doc(served: Path) -> dict[str, object]:
    return json.loads((served / MANIFEST_NAME).read_text())


MANIFEST_FIELDS = ["chunk_size", "files", "version", "source", "size", "chunks", "xxh3_128", "name"]


@SETTINGS
@given(field=st.sampled_from(MANIFEST_FIELDS), value=json_values)
def test_any_damaged_manifest_field_is_a_clean_outcome(field: str, value: object, served: Path, tmp_path: Path) -> None:
    directory = tmp_path / "copy"
    if not directory.exists():
        shutil.copytree(served, directory)
    doc = _manifest_doc(served)
    files = doc["files"]
    assert isinstance(files, dict)
    first = sorted(files)[0]
    if field in ("size", "chunks", "xxh3_128"):
        files[first][field] = value
    elif field == "name":
        files[str(value)] = files.pop(first)
    else:
        doc[field] = value
    (directory / MANIFEST_NAME).write_text(json.dumps(doc))
    result = invoke("verify", directory)
    assert result.exit_code in (0, 1, 3), result.stderr


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 200_000,
        b'{"a":' * 100_000,
        json.dumps({"chunk_size": 0}).encode(),
        b'{"format": "prewarm-manifest", "version": 1, "hash": "xxh3_128", "chunk_size": "16MiB", "files": {}}',
        b'{"format": "prewarm-manifest", "version": 1, "hash": "xxh3_128", "chunk_size": 0, "files": {}}',
        b"\xff\xfe",
        b"",
    ],
)
def test_a_manifest_that_is_not_one_is_exit_3(raw: bytes, served: Path, tmp_path: Path) -> None:
    directory = Path(shutil.copytree(served, tmp_path / "copy"))
    (directory / MANIFEST_NAME).write_bytes(raw)
    assert invoke("verify", directory).exit_code == 3


header_values = st.one_of(
    json_values,
    st.builds(lambda depth: "[" * depth + "]" * depth, st.integers(1, 100_000)),
    st.sampled_from(['"\\ud800"', '{"\\udc80": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}']),
)


@SETTINGS
@given(header=header_values)
def test_any_safetensors_header_is_a_clean_outcome(header: object, tmp_path: Path) -> None:
    raw = header.encode() if isinstance(header, str) else json.dumps(header).encode()
    src = tmp_path / "src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir()
    write_raw_safetensors(src / "model.safetensors", raw, b"\0")
    result = invoke("-q", "reshard", src, tmp_path / "dst")
    assert result.exit_code == 3, result.stderr
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("name", ['"\\ud800x"', '"ok\\udfff"'], ids=["lone high surrogate", "lone low surrogate"])
def test_a_tensor_name_with_a_lone_surrogate_is_refused(name: str, tmp_path: Path) -> None:
    raw = ("{" + name + ': {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}').encode()
    write_raw_safetensors(tmp_path / "model.safetensors", raw, b"\0")
    result = invoke("reshard", tmp_path / "model.safetensors", tmp_path / "dst")
    assert result.exit_code == 3 and "lone surrogate" in result.stderr


@SETTINGS
@given(raw=st.one_of(st.binary(max_size=64), json_values.map(lambda v: json.dumps(v).encode())))
def test_a_damaged_verification_record_is_ignored_with_a_warning(raw: bytes, served: Path, tmp_path: Path) -> None:
    directory = tmp_path / "copy"
    if not directory.exists():
        shutil.copytree(served, directory)
    (directory / RECORD_NAME).write_bytes(raw)
    result = invoke("status", directory, "--json")
    assert result.exit_code == 0
    verified = json.loads(result.stdout)["last_verification"]
    assert verified is None or isinstance(verified["ok"], bool)
    assert verified is not None or "ignoring a damaged verification record" in result.stderr


@SETTINGS
@given(suffix=st.one_of(st.integers(0, 10**30).map(str), st.text(alphabet="abc0-9.", max_size=20)))
def test_leftover_temp_names_never_break_a_reshard(suffix: str, tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    for name in (f".dst.prewarm-{suffix}.tmp", f".prewarm-{suffix}.tmp", f".prewarm-0000000000000000-{suffix}.tmp"):
        if "/" not in name:
            (out / name).mkdir(exist_ok=True)
    assert invoke("-q", "reshard", tiny_model, out / "dst").exit_code == 0


def test_a_header_length_past_any_file_is_exit_3(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 2**64 - 1) + b"{}")
    assert invoke("reshard", tmp_path / "model.safetensors", tmp_path / "dst").exit_code == 3


def test_every_error_has_a_hint_and_json_errors_go_to_stdout(tmp_path: Path) -> None:
    result = invoke("verify", tmp_path / "missing", "--json")
    doc = json.loads(result.stdout)
    assert doc["ok"] is False and doc["error"]["exit_code"] == 4 and doc["error"]["hint"]
    assert os.fspath(tmp_path / "missing") == doc["error"]["path"]
