"""``prewarm install-service`` / ``uninstall-service``: the systemd units, the service user and the
config, put in place or taken away again, idempotently.

Each command first plans (reading only), then applies the plan; ``dry_run`` stops after the plan.
Every step says what it changes, so a second install reports that nothing changed. With ``root``
(like ``systemctl --root``) only files under that directory are touched: no useradd, groupadd or
systemctl, for tests and packaging. The state, cache and runtime directories are systemd's to make
(StateDirectory=, CacheDirectory=, RuntimeDirectory= in the unit), with the right owner.

Nothing is written through a symlink: a directory on the way that is a symlink refuses the run, a
unit path that is one (a ``systemctl mask`` or ``link``) refuses it too, and a config path that
exists in any form is kept. Removal takes only regular files and real directories.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import re
import shlex
import shutil
import stat
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import prewarm
from prewarm.errors import FilesystemError, PrewarmError, UsageError
from prewarm.fsutil import fsync_path, write_file_atomic

SERVICE, SOCKET, EXAMPLE_CONFIG = "qwen-prewarm.service", "qwen-prewarm.socket", "qwen-prewarm.toml"
USER, CLIENT_GROUP = "prewarm", "prewarm-clients"
UNIT_DIR = Path("/etc/systemd/system")
CONFIG = Path("/etc/prewarm/qwen-prewarm.toml")
SOCKET_PATH = "/run/qwen-prewarm/api.sock"  # ListenStream= of the .socket unit, socket = in the config
STATE_DIR, CACHE_DIR, RUNTIME_DIR = Path("/var/lib/qwen-prewarm"), Path("/var/cache/qwen-prewarm"), Path("/run/qwen-prewarm")
HIDDEN_BY_PROTECT_HOME = (Path("/home"), Path("/root"), Path("/run/user"))  # systemd.exec(5), ProtectHome=
_UNIT_SAFE = re.compile(r"[A-Za-z0-9/._+@:-]+")  # a path that needs no quoting or %/$ escaping in a unit
_SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class ServiceSetupError(FilesystemError):
    """The system is not in a state the installer may change (not root, a symlink in the way...)."""


@dataclass(frozen=True)
class Step:
    """One thing a command does (``changed``) or finds already done (not ``changed``)."""

    action: str  # create, write, keep, remove, run
    target: str  # a path, a user or group, a command
    detail: str = ""
    changed: bool = True
    apply: Callable[[], None] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class ServiceResult:
    root: Path  # "/" for the running system
    dry_run: bool
    steps: tuple[Step, ...]
    notes: tuple[str, ...]  # what was not done, and why
    next_steps: tuple[str, ...]  # commands to run next

    @property
    def changed(self) -> bool:
        return any(step.changed for step in self.steps)


def units_source() -> Path:
    """The units and the example config: ``systemd/`` beside the package, in a checkout or an
    editable install."""
    folder = Path(prewarm.__file__).resolve().parents[1] / "systemd"
    for name in (SERVICE, SOCKET, EXAMPLE_CONFIG):
        if not (folder / name).is_file():
            raise ServiceSetupError(
                f"the systemd units are not where prewarm looks for them ({name} is missing)",
                str(folder),
                hint="install prewarm from a clone of its repository (pip install -e .), which has the systemd/ folder",
            )
    return folder


def install_service(root: Path | None = None, model: str | None = None, dry_run: bool = False) -> ServiceResult:
    """Creates the group and user (on the running system), writes the config when there is none
    (``model`` in it), writes both units with ExecStart= naming this prewarm, and daemon-reloads."""
    if model is not None and (not model.strip() or not model.isprintable()):
        raise UsageError(
            f"--model {model!r} is empty or has control characters", hint="give a hub repo id (owner/name) or a directory"
        )
    base = _target_root(root)
    live = root is None
    source = units_source()
    executable, notes = _service_executable(live)
    service = service_text((source / SERVICE).read_text(encoding="utf-8"), executable)
    units = {SERVICE: service, SOCKET: (source / SOCKET).read_text(encoding="utf-8")}
    steps = _account_steps(live, notes)
    config, unit_dir = _under(base, CONFIG), _under(base, UNIT_DIR)
    steps += _directory_steps(base, config.parent, unit_dir)
    if os.path.lexists(config):
        kind = "a symlink: not followed, left as it is" if config.is_symlink() else "exists: a config is never overwritten"
        steps.append(Step("keep", str(config), kind, changed=False))
        notes += _existing_config_notes(config, model)
    else:
        text = config_text((source / EXAMPLE_CONFIG).read_text(encoding="utf-8"), model)
        detail = "from the example" + (f", model {model}" if model else "") + ", mode 0644"
        steps.append(Step("write", str(config), detail, apply=_writer(config, text)))
    unit_steps = [_unit_step(unit_dir / name, text) for name, text in units.items()]
    steps += unit_steps
    if any(step.changed for step in unit_steps):
        steps += _daemon_reload(live, notes)
    notes.append(f"{STATE_DIR}, {CACHE_DIR} and {RUNTIME_DIR} are made by systemd when the service starts, owned by {USER}")
    follow = (
        f"systemctl enable --now {SOCKET} {SERVICE}",
        "systemctl status qwen-prewarm",
        "journalctl -u qwen-prewarm -f",
        f"usermod -aG {CLIENT_GROUP} USER   # lets USER use the socket (from their next login)",
    )
    return _finish(base, dry_run, steps, notes, follow)


def uninstall_service(root: Path | None = None, purge: bool = False, dry_run: bool = False) -> ServiceResult:
    """Stops and disables the units (on a running systemd), removes them; with ``purge`` also the
    config, state, cache and runtime directories (owned by the service user, unless ``root``)."""
    base = _target_root(root)
    live = root is None
    notes: list[str] = []
    steps: list[Step] = []
    unit_dir = _under(base, UNIT_DIR)
    present = [name for name in (SOCKET, SERVICE) if _is_regular(unit_dir / name)]
    systemctl = present and live and _systemd_running()
    if systemctl:
        steps.append(_command_step(["systemctl", "disable", "--now", *present], "stop and disable"))
    elif present and live:
        notes.append("systemd is not running here: nothing to stop or disable")
    elif present:
        notes.append(
            f"--root: nothing stopped or disabled (no systemctl); "
            f"`systemctl --root={base} disable {SOCKET} {SERVICE}` removes enablement links"
        )
    for name in (SERVICE, SOCKET):
        steps += _removal(unit_dir / name, "file")
    if systemctl:
        steps.append(_command_step(["systemctl", "daemon-reload"], "systemd forgets the units"))
    if purge:
        config = _under(base, CONFIG)
        removed = _removal(config, "file")
        steps += removed
        steps += _empty_directory_removal(config.parent, {config.name} if any(s.changed for s in removed) else set())
        for directory in (STATE_DIR, CACHE_DIR, RUNTIME_DIR):
            steps += _removal(_under(base, directory), "directory", owner=USER if live else None)
        notes.append(
            f"kept: the user {USER} and the group {CLIENT_GROUP} (`userdel {USER}; groupdel {CLIENT_GROUP}` removes them)"
        )
    else:
        notes.append(
            f"kept: {CONFIG}, {STATE_DIR}, {CACHE_DIR}, the user {USER} and the group {CLIENT_GROUP} "
            "(--purge removes the first three)"
        )
    return _finish(base, dry_run, steps, notes, ())


def service_text(template: str, executable: Path) -> str:
    """The service unit with ExecStart= running ``executable`` (its first word replaced)."""
    lines = template.splitlines(keepends=True)
    found = [i for i, line in enumerate(lines) if line.startswith("ExecStart=")]
    if len(found) != 1 or len(lines[found[0]].split()) < 2:
        raise PrewarmError(
            f"expected one ExecStart= line with a command in {SERVICE}, found {len(found)}",
            hint="restore systemd/qwen-prewarm.service from the repository",
        )
    _, rest = lines[found[0]].split(None, 1)
    lines[found[0]] = f"ExecStart={executable} {rest}"
    return "".join(lines)


def config_text(template: str, model: str | None) -> str:
    """The example config as the service's: socket_group on (the .socket unit's group) and
    ``model`` when given (a JSON string is a TOML basic string; the result is parsed to be sure)."""
    text, count = re.subn(rf'^# (socket_group = "{CLIENT_GROUP}")$', r"\1", template, count=1, flags=re.M)
    if model is not None and count:
        text, count = re.subn(r'^model = "[^"\n]*"', lambda _: "model = " + json.dumps(model), text, count=1, flags=re.M)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        doc = {}
    if not count or doc.get("socket_group") != CLIENT_GROUP or (model is not None and doc.get("model") != model):
        raise PrewarmError(
            f"cannot set socket_group{' and model' if model else ''} in the example config",
            EXAMPLE_CONFIG,
            hint=f'restore systemd/{EXAMPLE_CONFIG}: it needs the lines `model = ...` and `# socket_group = "{CLIENT_GROUP}"`',
        )
    return text


def _target_root(root: Path | None) -> Path:
    """The directory everything goes under: / (root needed) or the existing --root directory."""
    if root is None:
        if os.geteuid() != 0:
            raise ServiceSetupError(
                "installing the service needs root: it creates a system user and writes to /etc",
                hint="run it with sudo, or pass --root DIR to install the files into a directory tree",
            )
        return Path("/")
    if not root.is_dir():
        raise ServiceSetupError("--root is not a directory", str(root), hint="create it first, or name an existing directory")
    return Path(os.path.abspath(root))


def _under(base: Path, path: Path) -> Path:
    return base / path.relative_to("/")


def _service_executable(live: bool) -> tuple[Path, list[str]]:
    """The ``prewarm`` of the Python running us, as ExecStart= will name it: beside that Python (a
    virtual environment), else where pip puts this Python's scripts (/usr/local/bin on Debian)."""
    beside = Path(sys.executable).parent / "prewarm"
    candidates = [beside, Path(sysconfig.get_path("scripts")) / "prewarm"]
    executable = next((path for path in candidates if os.access(path, os.X_OK)), beside)
    if not os.access(executable, os.X_OK):
        raise ServiceSetupError(
            "no prewarm executable beside the Python running the installer",
            str(executable),
            hint="run the installer as the prewarm of the environment the service should use (e.g. /opt/prewarm/bin/prewarm)",
        )
    if not _UNIT_SAFE.fullmatch(str(executable)):
        raise ServiceSetupError(
            "the path has characters a unit file would have to quote or escape",
            str(executable),
            hint="install prewarm into a virtual environment at a plain path, e.g. python3 -m venv /opt/prewarm",
        )
    hidden = "ProtectHome=yes hides it from the service"
    if _hidden(executable) or _hidden(Path(os.path.realpath(executable))):
        raise ServiceSetupError(
            f"the prewarm executable lies under a home directory: {hidden}",
            str(executable),
            hint="install prewarm into a virtual environment under /opt: python3 -m venv /opt/prewarm, then pip install it there",
        )
    interpreter = Path(os.path.realpath(sys.executable))
    notes = []
    if _hidden(interpreter):
        message = f"its Python resolves to {interpreter}: {hidden}"
        if live:
            raise ServiceSetupError(
                message,
                str(executable),
                hint="make the virtual environment from a Python outside /home and /root (e.g. /usr/bin/python3)",
            )
        notes.append(f"WARNING: {executable}: {message}; the service cannot start from it on this machine")
    return executable, notes


def _hidden(path: Path) -> bool:
    return any(path.is_relative_to(protected) for protected in HIDDEN_BY_PROTECT_HOME)


def _account_steps(live: bool, notes: list[str]) -> list[Step]:
    useradd = [
        "useradd", "--system", "--home-dir", str(STATE_DIR), "--no-create-home", "--shell", _nologin(),
        "--comment", "prewarm daemon (qwen-prewarm.service)",
    ]  # fmt: skip
    useradd += ["--gid", USER] if _exists(grp.getgrnam, USER) else ["--user-group"]
    commands = [(CLIENT_GROUP, grp.getgrnam, ["groupadd", "--system", CLIENT_GROUP]), (USER, pwd.getpwnam, [*useradd, USER])]
    if not live:
        wanted = "; ".join(shlex.join(cmd) for _, _, cmd in commands)
        notes.append(f"--root: no useradd, groupadd, chown or systemctl was run; on the target system: {wanted}")
        return []
    steps = []
    for name, lookup, command in commands:
        if _exists(lookup, name):
            steps.append(Step("keep", name, "exists", changed=False))
        else:
            steps.append(_command_step(command, f"create {'user' if lookup is pwd.getpwnam else 'group'} {name}"))
    return steps


def _exists(lookup: Callable[[str], object], name: str) -> bool:
    try:
        lookup(name)
    except KeyError:
        return False
    return True


def _nologin() -> str:
    return next((p for p in ("/usr/sbin/nologin", "/sbin/nologin") if os.path.exists(p)), "/bin/false")


def _directory_steps(base: Path, *directories: Path) -> list[Step]:
    """Steps making ``directories`` and their missing parents (0755), each once. Each existing one
    below ``base`` must be a real directory: a symlink on the way would take the writes elsewhere."""
    missing: list[Path] = []
    for directory in directories:
        for path in (directory, *directory.parents):
            if not path.is_relative_to(base) or path == base:
                break
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if path not in missing:
                    missing.append(path)
                continue
            if stat.S_ISLNK(st.st_mode):
                raise _symlink_refused(path)
            if not stat.S_ISDIR(st.st_mode):
                raise ServiceSetupError("is not a directory", str(path), hint="move it away, then run again")
    return [Step("create", str(path), "directory, mode 0755", apply=_mkdir(path)) for path in sorted(missing)]


def _symlink_refused(path: Path) -> ServiceSetupError:
    return ServiceSetupError(
        "is a symlink; the installer does not write through symlinks",
        str(path),
        hint="replace it with a real directory (or, for a unit, `systemctl unmask` it / remove the link), then run again",
    )


def _unit_step(path: Path, text: str) -> Step:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return Step("write", str(path), "mode 0644", apply=_writer(path, text))
    if stat.S_ISLNK(st.st_mode):
        raise _symlink_refused(path)
    if not stat.S_ISREG(st.st_mode):
        raise ServiceSetupError("is not a regular file", str(path), hint="move it away, then run again")
    if stat.S_IMODE(st.st_mode) == 0o644 and path.read_bytes() == text.encode():
        return Step("keep", str(path), "up to date", changed=False)
    return Step("write", str(path), "replaced: it differed from this version's unit", apply=_writer(path, text))


def _existing_config_notes(config: Path, model: str | None) -> list[str]:
    notes = [f"--model {model} not applied: {config} exists; edit `model` in it"] if model else []
    try:
        doc = tomllib.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return [*notes, f"WARNING: {config} cannot be read as TOML ({exc}); the service will not start until it can"]
    if doc.get("socket_group") != CLIENT_GROUP:
        notes.append(
            f'WARNING: {config} does not set socket_group = "{CLIENT_GROUP}": members of that group will be refused (403)'
        )
    if doc.get("socket") != SOCKET_PATH:
        notes.append(f"WARNING: {config} sets socket = {doc.get('socket')!r}; {SOCKET} listens on {SOCKET_PATH}")
    return notes


def _daemon_reload(live: bool, notes: list[str]) -> list[Step]:
    if live and _systemd_running():
        notes.append("a running qwen-prewarm keeps its old unit settings until `systemctl restart qwen-prewarm`")
        return [_command_step(["systemctl", "daemon-reload"], "systemd reads the new units")]
    if live:
        notes.append("systemd is not running here (no /run/systemd/system): run `systemctl daemon-reload` once it is")
    return []


def _systemd_running() -> bool:
    return os.path.isdir("/run/systemd/system")  # sd_booted(3)


def _command_step(command: list[str], what: str) -> Step:
    def run() -> None:
        found = shutil.which(command[0], path=os.environ.get("PATH", "") + ":" + _SEARCH_PATH)
        if found is None:
            raise ServiceSetupError(
                f"{command[0]} not found", hint=f"install the package that provides {command[0]}, then run again"
            )
        proc = subprocess.run([found, *command[1:]], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            said = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
            raise ServiceSetupError(
                f"`{' '.join(command)}` failed: {said}", hint="fix what it says, then run the installer again"
            )

    return Step("run", " ".join(command), what, apply=run)


def _removal(path: Path, kind: str, owner: str | None = None) -> list[Step]:
    """A step removing the regular file or real directory (``kind``) at ``path``, of ``owner`` when
    given; anything else there (a symlink above all) is kept and said so."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return []
    if stat.S_ISLNK(st.st_mode):
        return [Step("keep", str(path), "a symlink: not followed, not removed", changed=False)]
    wanted = stat.S_ISDIR(st.st_mode) if kind == "directory" else stat.S_ISREG(st.st_mode)
    if not wanted:
        return [
            Step("keep", str(path), f"not a {'directory' if kind == 'directory' else 'regular file'}: not removed", changed=False)
        ]
    if owner is not None and _owner_name(st.st_uid) != owner:
        return [
            Step("keep", str(path), f"owned by {_owner_name(st.st_uid)}, not {owner}: not made for the service", changed=False)
        ]
    if kind == "directory":
        return [Step("remove", str(path), "directory and everything in it", apply=lambda: shutil.rmtree(path))]
    return [Step("remove", str(path), "file", apply=lambda: os.unlink(path))]


def _empty_directory_removal(directory: Path, leaving: set[str]) -> list[Step]:
    """``directory`` removed when what it holds is being removed (rmdir: never what others put there)."""
    if not directory.is_dir() or directory.is_symlink() or set(os.listdir(directory)) - leaving:
        return []
    return [Step("remove", str(directory), "empty directory", apply=lambda: os.rmdir(directory))]


def _owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _writer(path: Path, text: str) -> Callable[[], None]:
    def write() -> None:
        with _umask(0o022):  # the file gets exactly 0644, whatever the caller's umask
            write_file_atomic(path, text.encode(), 0o644)

    return write


def _mkdir(path: Path) -> Callable[[], None]:
    def make() -> None:
        with _umask(0o022):
            os.mkdir(path, 0o755)
        fsync_path(path.parent)

    return make


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)  # process-wide; the CLI runs the installer on its only thread
    try:
        yield
    finally:
        os.umask(previous)


def _finish(base: Path, dry_run: bool, steps: list[Step], notes: list[str], follow: tuple[str, ...]) -> ServiceResult:
    if not dry_run:
        for step in steps:
            if step.changed and step.apply is not None:
                step.apply()
    return ServiceResult(base, dry_run, tuple(steps), tuple(notes), follow)
