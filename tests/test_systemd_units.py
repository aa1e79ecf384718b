"""The systemd units and `prewarm install-service` / `uninstall-service`, with the real tools:
systemd-analyze (verify, security, syscall-filter), the real CLI in a subprocess, a real seccomp
filter, setpriv. systemd need not be running (it is not PID 1 on the test machines): every install
here goes into a directory tree with --root."""

from __future__ import annotations

import contextlib
import ctypes.util
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ROOT, assert_clean_failure, run_prewarm

PREWARM = Path(sys.executable).parent / "prewarm"  # what the installer puts in ExecStart=
UNITS = Path("etc/systemd/system")
SERVICE, SOCKET = UNITS / "qwen-prewarm.service", UNITS / "qwen-prewarm.socket"
CONFIG = Path("etc/prewarm/qwen-prewarm.toml")


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.fail("systemd-analyze is not installed: these tests check the units with it (Debian: apt-get install systemd)")
    return found


@pytest.fixture
def root(tmp_path: Path) -> Path:
    directory = tmp_path / "root"
    directory.mkdir()
    return directory


@pytest.fixture
def installed(root: Path) -> Path:
    run_prewarm("install-service", "--root", root, check=True)
    return root


def install(root: Path, *args: str) -> dict[str, object]:
    proc = run_prewarm("install-service", "--root", root, "--json", *args, check=True)
    doc: dict[str, object] = json.loads(proc.stdout)
    return doc


def tree(root: Path) -> dict[str, tuple[int, int, bytes | str]]:
    """Every path under ``root``: mode, inode, and contents (a file) or target (a symlink)."""
    found = {}
    for path in sorted(root.rglob("*")):
        st = os.lstat(path)
        content = os.readlink(path) if path.is_symlink() else path.read_bytes() if path.is_file() else b""
        found[str(path.relative_to(root))] = (st.st_mode, st.st_ino, content)
    return found


# --- the units, as systemd reads them -----------------------------------------------------------


def test_the_installed_units_pass_systemd_analyze_verify(installed: Path) -> None:
    # verify fails when ExecStart='s binary is missing: the installed unit names this venv's prewarm,
    # which exists. It does not resolve User=/Group= (checked here: a unit naming a user that does
    # not exist verifies), so the prewarm user need not exist on the test machine.
    proc = subprocess.run(
        [systemd_analyze(), "verify", "--man=no", installed / SERVICE, installed / SOCKET],
        capture_output=True,
        text=True,
        check=False,
    )
    # verify exits 0 on an unknown key, only warning about it: any output is a failure here
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), proc.stdout + proc.stderr


def test_systemd_analyze_verify_catches_a_bad_unit(tmp_path: Path) -> None:
    """The check above can fail: the repository's unit names /usr/local/bin/prewarm, which is not
    installed here, and a misspelt key is reported."""
    broken = tmp_path / "qwen-prewarm.service"
    broken.write_text((ROOT / "systemd" / "qwen-prewarm.service").read_text().replace("RestartSec=", "RestartSek="))
    proc = subprocess.run([systemd_analyze(), "verify", "--man=no", broken], capture_output=True, text=True, check=False)
    said = proc.stdout + proc.stderr
    assert "RestartSek" in said and ("not executable" in said or "/usr/local/bin/prewarm" in said), said


def test_security_exposure_is_ok(installed: Path) -> None:
    proc = subprocess.run(
        [systemd_analyze(), "security", "--offline=true", "--no-pager", installed / SERVICE],
        capture_output=True,
        text=True,
        check=False,
    )
    found = re.search(r"Overall exposure level for qwen-prewarm\.service: (\d+\.\d)", proc.stdout)
    assert found, proc.stdout + proc.stderr
    assert float(found.group(1)) <= 4.9, proc.stdout


def test_the_system_call_filter_lets_prewarm_measure_the_page_cache(installed: Path, tiny_model: Path) -> None:
    """The unit's SystemCallFilter=, expanded by systemd-analyze and loaded as a real seccomp filter
    (libseccomp, through ctypes) the way systemd does: listed calls allowed, others EPERM. systemd
    252 does not know cachestat(2), so prewarm falls back to mincore(2), which @system-service
    leaves out: without the unit's extra `mincore` the measurement fails (the control)."""
    lines = [line for line in (installed / SERVICE).read_text().splitlines() if line.startswith("SystemCallFilter=")]
    listed = " ".join(line.split("=", 1)[1] for line in lines).split()
    assert "@system-service" in listed and "SystemCallErrorNumber=EPERM" in (installed / SERVICE).read_text()
    allowed = set().union(*(_syscalls(name) for name in listed)) | {"execve", "exit", "exit_group", "rt_sigreturn", "getrlimit"}
    status = [str(PREWARM), "status", str(tiny_model), "--json"]
    proc = _filtered(allowed, status)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["resident_bytes"] is not None
    control = _filtered(allowed - {"mincore"}, status)
    assert control.returncode != 0 and "permission denied" in control.stderr, control.stdout + control.stderr


def _syscalls(name: str) -> set[str]:
    if not name.startswith("@"):
        return {name}
    out = subprocess.run([systemd_analyze(), "syscall-filter", name], capture_output=True, text=True, check=True).stdout
    entries = [line.strip() for line in out.splitlines()[1:] if line.strip() and not line.strip().startswith("#")]
    return set().union(*(_syscalls(entry) for entry in entries))


_FILTER = """
import ctypes, os, sys
lib = ctypes.CDLL(sys.argv[1], use_errno=True)
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
lib.seccomp_load.argtypes = [ctypes.c_void_p]
ctx = lib.seccomp_init(0x00050000 | 1)  # SCMP_ACT_ERRNO(EPERM): SystemCallErrorNumber=EPERM
for name in sys.argv[2].split(","):
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr >= 0:  # a name this libseccomp does not know is not a call this kernel has
        assert lib.seccomp_rule_add(ctx, 0x7FFF0000, nr, 0) == 0, name  # SCMP_ACT_ALLOW
assert lib.seccomp_load(ctx) == 0  # sets no_new_privs first, as NoNewPrivileges=yes
os.execv(sys.argv[3], sys.argv[3:])
"""


def _filtered(allowed: set[str], argv: list[str]) -> subprocess.CompletedProcess[str]:
    library = ctypes.util.find_library("seccomp")
    if library is None:
        pytest.fail("libseccomp is not installed (Debian: apt-get install libseccomp2; systemd depends on it)")
    command = [sys.executable, "-c", _FILTER, library, ",".join(sorted(allowed)), *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_exec_start_is_a_daemon_command_the_cli_accepts(installed: Path) -> None:
    lines = [line for line in (installed / SERVICE).read_text().splitlines() if line.startswith("ExecStart=")]
    assert len(lines) == 1
    argv = shlex.split(lines[0].removeprefix("ExecStart="))
    assert argv[0] == str(PREWARM) and argv[1] == "daemon", argv
    accepted = set(re.findall(r"--[a-z][a-z-]*", run_prewarm("daemon", "--help", check=True).stdout))
    options = [arg for arg in argv[2:] if arg.startswith("--")]
    assert options and set(options) <= accepted, (options, accepted)
    assert argv[argv.index("--config") + 1] == "/" + str(CONFIG)
    assert (installed / CONFIG).is_file()


def test_the_socket_unit_listens_where_the_config_says(installed: Path) -> None:
    """The daemon matches passed sockets to its settings by address: the two must agree."""
    config = tomllib.loads((installed / CONFIG).read_text())
    listen = [line.split("=", 1)[1] for line in (installed / SOCKET).read_text().splitlines() if line.startswith("ListenStream=")]
    handoff = config.get("handoff_socket", config["socket"] + ".handoff")
    assert listen == [config["socket"], handoff]
    unit = (installed / SOCKET).read_text()
    assert f"SocketGroup={config['socket_group']}" in unit and "SocketMode=0660" in unit
    assert f"SupplementaryGroups={config['socket_group']}" in (installed / SERVICE).read_text()


# --- install-service ------------------------------------------------------------------------------


def test_install_writes_the_units_and_config_with_their_modes(root: Path) -> None:
    doc = install(root, "--model", "Qwen/Qwen2.5-0.5B-Instruct")
    assert doc["ok"] and doc["changed"] and not doc["dry_run"]
    assert any("no useradd" in note for note in doc["notes"])  # type: ignore[attr-defined]
    for directory in ("etc", "etc/prewarm", "etc/systemd", "etc/systemd/system"):
        assert stat.S_IMODE(os.lstat(root / directory).st_mode) == 0o755, directory
    for path in (SERVICE, SOCKET, CONFIG):
        st = os.lstat(root / path)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644, path
    example = (ROOT / "systemd" / "qwen-prewarm.service").read_text()
    assert (root / SERVICE).read_text() == example.replace("ExecStart=/usr/local/bin/prewarm ", f"ExecStart={PREWARM} ")
    assert (root / SOCKET).read_bytes() == (ROOT / "systemd" / "qwen-prewarm.socket").read_bytes()
    config = tomllib.loads((root / CONFIG).read_text())
    original = tomllib.loads((ROOT / "systemd" / "qwen-prewarm.toml").read_text())
    assert config == original | {"model": "Qwen/Qwen2.5-0.5B-Instruct", "socket_group": "prewarm-clients"}


def test_a_second_install_changes_nothing(installed: Path) -> None:
    before = tree(installed)
    doc = install(installed)
    assert doc["changed"] is False and all(not step["changed"] for step in doc["steps"])  # type: ignore[attr-defined]
    assert tree(installed) == before
    human = run_prewarm("install-service", "--root", installed, check=True).stdout
    assert "nothing changed" in human.splitlines()[0]


def test_a_dry_run_changes_nothing(root: Path) -> None:
    doc = install(root, "--dry-run")
    assert doc["dry_run"] and doc["changed"] and list(root.iterdir()) == []
    human = run_prewarm("install-service", "--root", root, "--dry-run", check=True).stdout
    assert "would write" in human and list(root.iterdir()) == []


def test_an_existing_config_is_kept_byte_for_byte(root: Path) -> None:
    (root / CONFIG).parent.mkdir(parents=True)
    mine = b'model = "my/model"  # edited by hand\nsocket = "/run/qwen-prewarm/api.sock"\n\xff not even UTF-8\n'
    (root / CONFIG).write_bytes(mine)
    os.chmod(root / CONFIG, 0o600)
    doc = install(root, "--model", "other/model")
    assert (root / CONFIG).read_bytes() == mine and stat.S_IMODE(os.stat(root / CONFIG).st_mode) == 0o600
    assert (root / SERVICE).is_file()
    notes = "\n".join(doc["notes"])  # type: ignore[arg-type]
    assert "--model other/model not applied" in notes and "cannot be read as TOML" in notes


def test_a_changed_unit_is_replaced(installed: Path) -> None:
    (installed / SERVICE).write_text("[Service]\nExecStart=/bin/false\n")
    doc = install(installed)
    assert doc["changed"] and (installed / SERVICE).read_text().startswith("# prewarm")


def test_a_symlink_at_the_config_path_is_not_written_through(root: Path, tmp_path: Path) -> None:
    (root / CONFIG).parent.mkdir(parents=True)
    target = tmp_path / "elsewhere.toml"
    (root / CONFIG).symlink_to(target)
    doc = install(root)
    assert not target.exists() and os.readlink(root / CONFIG) == str(target)
    assert any("symlink" in step["detail"] for step in doc["steps"])  # type: ignore[attr-defined]


def test_a_symlink_at_a_unit_path_refuses_the_install(root: Path) -> None:
    """A symlink there is a `systemctl mask` (-> /dev/null) or `systemctl link`: the admin's
    decision, so the installer refuses (exit 4) before changing anything, instead of unmasking."""
    (root / UNITS).mkdir(parents=True)
    (root / SERVICE).symlink_to("/dev/null")
    proc = run_prewarm("install-service", "--root", root)
    assert_clean_failure(proc, 4, str(root / SERVICE), "symlink")
    assert "unmask" in proc.stderr
    assert os.readlink(root / SERVICE) == "/dev/null" and not (root / CONFIG).exists() and not (root / SOCKET).exists()


def test_a_symlinked_directory_on_the_way_refuses_the_install(root: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / "etc").mkdir()
    (root / "etc" / "systemd").symlink_to(elsewhere)
    assert_clean_failure(run_prewarm("install-service", "--root", root), 4, str(root / "etc" / "systemd"), "symlink")
    assert list(elsewhere.iterdir()) == [] and not (root / CONFIG).exists()


def test_install_needs_root_without_root_option(tmp_path: Path) -> None:
    """As nobody (setpriv, when we are root) or as ourselves (when we are not): one Error line."""
    command = [str(PREWARM), "install-service"]
    if os.geteuid() == 0:
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=60, check=False)
    assert_clean_failure(proc, 4, "needs root")
    assert proc.stderr.splitlines()[1].startswith("  hint:") and "--root" in proc.stderr and proc.stdout == ""
    assert_clean_failure(subprocess.run([*command, "--json"], capture_output=True, text=True, cwd=tmp_path, check=False), 4)


def test_a_prewarm_under_a_home_directory_is_refused(tmp_path: Path) -> None:
    """ProtectHome=yes hides /home and /root from the service: a prewarm there could never start.
    A virtual environment is made under our home (/root or /home/...) from this one."""
    home = Path.home()
    if not any(home.is_relative_to(p) for p in ("/home", "/root")):
        pytest.skip(f"our home {home} is not under /home or /root")
    with _venv_under(home) as prewarm:
        proc = subprocess.run(
            [prewarm.parent / "python", "-m", "prewarm", "install-service", "--root", tmp_path],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            timeout=60,
            check=False,
        )
    assert_clean_failure(proc, 4, str(prewarm), "home directory")
    assert "/opt" in proc.stderr and list(tmp_path.iterdir()) == []


@contextlib.contextmanager
def _venv_under(home: Path) -> Iterator[Path]:
    """bin/python (a link to this interpreter), bin/prewarm, and this venv's packages, under ``home``."""
    directory = Path(tempfile.mkdtemp(prefix=".prewarm-test-", dir=home))
    try:
        venv = Path(sys.prefix)
        (directory / "bin").mkdir()
        (directory / "bin" / "python").symlink_to(os.path.realpath(sys.executable))
        (directory / "lib").symlink_to(venv / "lib")
        shutil.copy(venv / "pyvenv.cfg", directory / "pyvenv.cfg")
        shutil.copy(PREWARM, directory / "bin" / "prewarm")
        yield directory / "bin" / "prewarm"
    finally:
        shutil.rmtree(directory)


def test_missing_units_are_one_error_naming_where_prewarm_looked(tmp_path: Path, root: Path) -> None:
    """A prewarm installed without the repository's systemd/ folder beside it (a plain wheel)."""
    shutil.copytree(ROOT / "prewarm", tmp_path / "pkg" / "prewarm", ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-m", "prewarm", "install-service", "--root", root],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "pkg")},
        cwd=tmp_path,  # python -m puts the working directory first on sys.path
        timeout=60,
        check=False,
    )
    assert_clean_failure(proc, 4, str(tmp_path / "pkg" / "systemd"))
    assert list(root.iterdir()) == []


# --- uninstall-service ----------------------------------------------------------------------------


def test_uninstall_removes_the_units_and_keeps_the_config(installed: Path) -> None:
    config = (installed / CONFIG).read_bytes()
    doc = json.loads(run_prewarm("uninstall-service", "--root", installed, "--json", check=True).stdout)
    assert doc["changed"] and not (installed / SERVICE).exists() and not (installed / SOCKET).exists()
    assert (installed / CONFIG).read_bytes() == config
    again = json.loads(run_prewarm("uninstall-service", "--root", installed, "--json", check=True).stdout)
    assert again["changed"] is False


def test_purge_removes_the_config_and_directories_but_follows_no_symlink(installed: Path, tmp_path: Path) -> None:
    state = installed / "var/lib/qwen-prewarm"
    (state / "deep").mkdir(parents=True)
    (state / "deep" / "file").write_text("x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    (state / "deep" / "link").symlink_to(outside)  # inside a removed directory: removed, not followed
    (installed / "var/cache").mkdir(parents=True)
    (installed / "var/cache/qwen-prewarm").symlink_to(outside)  # the directory itself a symlink: kept
    (installed / "run/qwen-prewarm").mkdir(parents=True)
    doc = json.loads(run_prewarm("uninstall-service", "--root", installed, "--purge", "--json", check=True).stdout)
    assert not (installed / CONFIG).exists() and not (installed / CONFIG).parent.exists()
    assert not state.exists() and not (installed / "run/qwen-prewarm").exists()
    assert (installed / "var/cache/qwen-prewarm").is_symlink() and (outside / "precious").read_text() == "keep me"
    kept = [step for step in doc["steps"] if not step["changed"]]
    assert [step["target"] for step in kept] == [str(installed / "var/cache/qwen-prewarm")]


def test_purge_keeps_a_config_that_is_a_symlink_and_what_it_leads_to(installed: Path, tmp_path: Path) -> None:
    (installed / CONFIG).unlink()
    target = tmp_path / "mine.toml"
    target.write_text('model = "x"\n')
    (installed / CONFIG).symlink_to(target)
    run_prewarm("uninstall-service", "--root", installed, "--purge", check=True)
    assert (installed / CONFIG).is_symlink() and target.read_text() == 'model = "x"\n'
