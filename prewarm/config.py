"""Where prewarm keeps things, and the daemon's settings: the one module that reads the environment.

huggingface_hub reads its own variables (HF_TOKEN, HF_HOME, HF_ENDPOINT, HF_HUB_OFFLINE).
The daemon's settings come from one TOML file (stdlib ``tomllib``), then the environment
(``PREWARM_*``), then command-line flags, each overriding the one before; a bad value is
refused at start naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import grp
import ipaddress
import os
import pwd
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prewarm.errors import UsageError


def cache_root() -> Path:
    """``$PREWARM_CACHE``; else ``$HF_HOME/prewarm`` when HF_HOME is set (it is where the user put
    large downloads); else ``$XDG_CACHE_HOME/prewarm`` or ``~/.cache/prewarm``."""
    if os.environ.get("PREWARM_CACHE"):
        return Path(os.environ["PREWARM_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "prewarm"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "prewarm"


def runtime_root() -> Path:
    """Where the daemon makes its private runtime directory (engine sockets): systemd's
    ``$RUNTIME_DIRECTORY``, else ``$XDG_RUNTIME_DIR``, else /tmp. Unix socket paths must stay
    under 108 bytes, so this is never a deep directory."""
    for name in ("RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"):
        value = os.environ.get(name, "").split(":")[0]
        if value and os.path.isdir(value):
            return Path(value)
    return Path("/tmp")


SERVICE_SOCKET = Path("/run/qwen-prewarm/api.sock")  # the systemd service's public socket


def default_socket() -> Path:
    """The daemon's public socket for clients (ask, chat, status): ``$PREWARM_SOCKET`` (the same
    variable that sets the daemon's own), else the systemd service's socket."""
    return Path(os.environ.get("PREWARM_SOCKET") or SERVICE_SOCKET)


def debug_enabled() -> bool:
    return os.environ.get("PREWARM_DEBUG") == "1"


def engine_environment() -> dict[str, str]:
    """What the engine inherits: our environment (CUDA_VISIBLE_DEVICES, HF_TOKEN, VLLM_* ...)."""
    return dict(os.environ)


def systemd_environment() -> dict[str, str]:
    """The variables of systemd's protocols that the daemon speaks (sd_notify, socket activation)."""
    names = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "FDSTORE")
    return {name: os.environ[name] for name in names if name in os.environ}


RELOAD_MODES = ("blue-green", "restart")


@dataclass(frozen=True)
class DaemonSettings:
    """Everything ``prewarm daemon`` does, in one frozen object (see systemd/qwen-prewarm.toml)."""

    model: str  # a hub repo id (owner/name) or a directory
    socket: Path
    revision: str = "main"
    served_model_name: str | None = None  # default: the repo id, or the directory's name
    handoff_socket: Path | None = None  # default: the socket's path + ".handoff"
    socket_mode: int = 0o660
    socket_group: str | None = None
    allowed_users: tuple[str, ...] = ()  # besides root and the daemon's own user
    allowed_groups: tuple[str, ...] = ()
    cache_dir: Path = field(default_factory=cache_root)
    max_shard_size: str = "5GB"
    engine_args: tuple[str, ...] = ()  # passed to vLLM untouched
    gpu: bool | None = None  # None: detect (an NVIDIA device node)
    warmup: bool = True
    lock: bool = False  # mlock the weights (needs LimitMEMLOCK)
    queue_max: int = 1024
    queue_timeout_s: float = 600.0
    startup_timeout_s: float = 1800.0
    max_restarts: int = 5  # deaths within restart_window_s before the state is failed
    restart_window_s: float = 600.0
    restart_backoff_s: float = 1.0
    reload: str = "blue-green"
    grace_s: float = 30.0
    monitor_interval_s: float = 30.0  # how often the weights' residency and files are checked
    watch_source: bool = True  # a changed local model source triggers a reload
    http: str | None = None  # "HOST:PORT": a TCP listener for the chat page and the API
    api_key: str | None = None  # then every TCP request needs "Authorization: Bearer KEY"
    engine_python: str | None = None  # the Python that runs vLLM (default: prewarm's own)
    load_format: str = "prewarm"  # vLLM's --load-format: prewarm's checked reader, or e.g. "auto"
    load_check: str = "hash"  # hash every byte as it loads, or "record": trust a verification of unchanged files
    load_buffers: int = 0  # the reader's host buffers of 4 MiB per reader thread (0: its default, 2)

    def load_options(self) -> dict[str, object]:
        """The prewarm format's --model-loader-extra-config: only what differs from its defaults."""
        options: dict[str, object] = {"check": self.load_check} if self.load_check != "hash" else {}
        return options | ({"buffers": self.load_buffers} if self.load_buffers else {})

    @property
    def http_address(self) -> tuple[str, int] | None:
        return None if self.http is None else parse_http_address(self.http)

    @property
    def handoff_path(self) -> Path:
        return self.handoff_socket or Path(str(self.socket) + ".handoff")

    def allowed_uids(self) -> frozenset[int]:
        return frozenset(_uid(name) for name in self.allowed_users)

    def allowed_gids(self) -> frozenset[int]:
        groups = [*self.allowed_groups, *([self.socket_group] if self.socket_group else [])]
        return frozenset(_gid(name) for name in groups)


_KEYS = {f.name: f for f in dataclasses.fields(DaemonSettings)}
_DURATIONS = {"queue_timeout_s", "startup_timeout_s", "restart_window_s", "restart_backoff_s", "grace_s", "monitor_interval_s"}
_COUNTS = {"queue_max", "max_restarts"}
LOAD_CHECKS = ("hash", "record")


def load_settings(config_file: Path | None, flags: Mapping[str, Any]) -> DaemonSettings:
    """TOML file < PREWARM_* environment < flags (those not None); every value checked."""
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(_read_toml(config_file))
    for key in _KEYS:
        env = os.environ.get(f"PREWARM_{key.upper()}")
        if env is not None and key not in ("engine_args",):
            values[key] = env
    values.update({k: v for k, v in flags.items() if v is not None and v != ()})
    where = str(config_file) if config_file else "the command line"
    for key in ("model", "socket"):
        if not values.get(key):
            raise UsageError(f"no {key} given", where, hint=f"set {key} in the config file or pass --{key}")
    settings = DaemonSettings(**{key: _check(key, value, where) for key, value in values.items()})
    address = settings.http_address
    if address is not None and not is_loopback(address[0]) and not settings.api_key:
        raise UsageError(
            f"http = {settings.http!r} would let anyone who can reach it use the model: a non-loopback address needs an api_key",
            where,
            hint="set api_key (or PREWARM_API_KEY, e.g. from an EnvironmentFile), or listen on 127.0.0.1",
        )
    return settings


def parse_http_address(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) -> (host, port); ValueError saying what is wrong."""
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("HOST:PORT with a port from 1 to 65535, e.g. 127.0.0.1:8000 or [::1]:8000")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read the config file: {exc.strerror}", str(path), hint="check the path") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"not valid TOML: {exc}", str(path), hint="fix the line named; see systemd/qwen-prewarm.toml") from None
    engine = doc.pop("engine", {})
    if not isinstance(engine, dict):
        raise UsageError("[engine] must be a table of vLLM options", str(path), hint="write `[engine]` then `key = value` lines")
    unknown = sorted(set(doc) - set(_KEYS) - {"engine_args"})
    if unknown:
        raise UsageError(f"unknown setting {unknown[0]!r}", str(path), hint=f"known settings: {', '.join(sorted(_KEYS))}")
    doc["engine_args"] = (*engine_options(engine, path), *_strings("engine_args", doc.get("engine_args", []), str(path)))
    return doc


def engine_options(table: Mapping[str, Any], source: Path | str) -> list[str]:
    """vLLM flags from a TOML table: ``tensor_parallel_size = 2`` -> ``--tensor-parallel-size 2``,
    ``enforce_eager = true`` -> ``--enforce-eager``, ``false`` -> left out, a list -> repeated."""
    args: list[str] = []
    for key, value in table.items():
        flag = "--" + key.replace("_", "-")
        values = value if isinstance(value, list) else [value]
        for item in values:
            if item is True:
                args.append(flag)
            elif item is False:
                continue
            elif isinstance(item, str | int | float):
                args += [flag, str(item)]
            else:
                raise UsageError(
                    f"engine option {key!r} has a value of type {type(item).__name__}",
                    str(source),
                    hint="use a string, number, boolean or a list of them",
                )
    return args


def _strings(key: str, value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise UsageError(f"{key} must be a list of strings, not {value!r}", where, hint=f'write {key} = ["a", "b"]')


def _check(key: str, value: Any, where: str) -> Any:
    """``value`` converted to the type of ``key``; a UsageError naming both when it cannot be."""

    def bad(allowed: str) -> UsageError:
        return UsageError(f"setting {key} = {value!r} is not allowed: {allowed}", where, hint="see systemd/qwen-prewarm.toml")

    if key not in _KEYS:
        raise bad("there is no such setting")
    if key in ("socket", "handoff_socket", "cache_dir"):
        if not isinstance(value, str | Path) or not str(value):
            raise bad("a non-empty path")
        return Path(value)
    if key in _DURATIONS:
        number = _number(value)
        if number is None or not 0 <= number <= 10**7:
            raise bad("a number of seconds from 0 to 10000000")
        return number
    if key in _COUNTS:
        number = _number(value)
        if number is None or number != int(number) or not 0 <= number <= 10**6:
            raise bad("a whole number from 0 to 1000000")
        return int(number)
    if key == "socket_mode":
        mode = int(value, 8) if isinstance(value, str) and value.strip().isdigit() else value
        if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o777:
            raise bad('an octal mode such as 0660 (a string in TOML: "0660")')
        return mode
    if key in ("warmup", "lock", "gpu", "watch_source"):
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "0", "false", "no"):
            return value.lower() in ("1", "true", "yes")
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if key == "reload":
        if value not in RELOAD_MODES:
            raise bad(" or ".join(RELOAD_MODES))
        return value
    if key == "load_check":
        if value not in LOAD_CHECKS:
            raise bad(" or ".join(LOAD_CHECKS))
        return value
    if key == "load_buffers":
        number = _number(value)
        if number is None or number != int(number) or not 0 <= number <= 256:
            raise bad("a whole number from 0 (automatic) to 256")
        return int(number)
    if key == "load_format" and not (isinstance(value, str) and value.replace("_", "").replace("-", "").isalnum()):
        raise bad('"prewarm", or a vLLM load format such as "auto" or "safetensors"')
    if key in ("allowed_users", "allowed_groups", "engine_args"):
        names = _strings(key, value, where)
        for name in names if key != "engine_args" else ():
            (_uid if key == "allowed_users" else _gid)(name)
        return names
    if key == "http":
        try:
            parse_http_address(str(value))
        except ValueError as exc:
            raise bad(str(exc)) from None
    if key == "api_key" and (not isinstance(value, str) or len(value) < 16 or not value.isprintable() or " " in value):
        raise UsageError(  # never echo a secret, even a bad one
            "setting api_key is not allowed: it needs at least 16 printable characters without spaces",
            where,
            hint="make one with `openssl rand -hex 24`",
        )
    if key == "engine_python" and not (isinstance(value, str) and os.path.isabs(value) and os.access(value, os.X_OK)):
        raise bad("the absolute path of a Python executable that has vLLM installed")
    if key == "socket_group":
        _gid(str(value))
    if not isinstance(value, str):
        raise bad("a string")
    return value


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _uid(name: str) -> int:
    try:
        return int(name) if name.isdigit() else pwd.getpwnam(name).pw_uid
    except KeyError:
        raise UsageError(f"no user named {name!r}", hint="create the user or fix allowed_users") from None


def _gid(name: str) -> int:
    try:
        return int(name) if name.isdigit() else grp.getgrnam(name).gr_gid
    except KeyError:
        raise UsageError(f"no group named {name!r}", hint="create the group or fix the group setting") from None
