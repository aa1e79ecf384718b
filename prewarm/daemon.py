"""The daemon: the disk stages, then a hot vLLM engine behind prewarm's own sockets.

startup: bind the sockets first (clients may connect at once) -> prepare the weights (fetch,
reshard, verify, warm: blocking stages, run in a thread) -> start the engine -> wait until it
answers /health and a one-token warm-up -> ready. Then supervise: an engine that dies is
restarted with backoff; too many deaths in a window and the state is ``failed`` until a reload.
Signal handlers only set flags; the supervisor decides.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import grp
import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from prewarm.config import DaemonSettings, runtime_root
from prewarm.engine import Engine, EngineFailed, EngineSpec, has_gpu, has_prewarm_loader
from prewarm.errors import PrewarmError
from prewarm.gateway import Gateway, Unavailable
from prewarm.handoff import HandoffServer
from prewarm.notify import ActivationError, Notifier, listen_sockets
from prewarm.peer import AccessPolicy
from prewarm.prepare import Prepared, prepare
from prewarm.progress import CancellableProgress, Cancelled, PlainProgress, TrackedProgress
from prewarm.tcpaccess import TcpAccess
from prewarm.units import format_size
from prewarm.unixsock import bind_unix, private_runtime_dir, remove_unix
from prewarm.warm import PageLock, residency, warm

log = logging.getLogger(__name__)
EXTEND_S = 300.0  # while start-up makes progress, systemd's start timeout is kept this far ahead
PROGRESS_INTERVAL_S = 5.0
PREPARING = ("fetching", "resharding", "verifying", "warming")
STATES = ("fetching", "resharding", "verifying", "warming", "starting", "ready", "reloading", "degraded", "failed", "stopping")


class Daemon:
    def __init__(self, settings: DaemonSettings, env: dict[str, str], systemd: dict[str, str]) -> None:
        self.settings = settings
        self.env = env
        self.systemd = systemd
        self.notifier = Notifier(systemd)
        self.policy = AccessPolicy(settings.allowed_uids(), settings.allowed_gids())
        self.state = "starting"
        self.started = time.monotonic()
        self.phases: list[dict[str, Any]] = []
        self.prepared: Prepared | None = None
        self.engine: Engine | None = None
        self.failure: dict[str, Any] | None = None
        self.deaths: collections.deque[float] = collections.deque()
        self.restarts = 0
        self.queue = {"waiting": 0, "served": 0, "timed_out": 0, "rejected": 0}
        self.ready = asyncio.Event()
        self.wake = asyncio.Event()  # something for the supervisor: stop, reload, a death
        self.stop_requested = False
        self.reload_reason: str | None = None
        address = settings.http_address
        self.tcp = None if address is None else TcpAccess(address[0], address[1], settings.api_key)
        self.gateway = Gateway(self, self.policy, settings.grace_s, self.tcp)
        self.handoff: HandoffServer | None = None
        self.runtime_dir: Path | None = None
        self.page_lock: PageLock | None = None
        self.progress = TrackedProgress(PlainProgress())  # the stages' bytes: in status and the log
        self.stopping_stages = threading.Event()  # a stop calls off a stage running in the executor
        self.ever_ready = False
        self.stored_sockets = False  # in systemd's descriptor store: their files must outlive us

    # -- state -------------------------------------------------------------------------------
    def set_state(self, state: str, detail: str = "") -> None:
        assert state in STATES, state
        self.state = state
        text = f"{state}: {detail}" if detail else state
        log.info("state %s", text)
        self.notifier.status(text)

    def ready_engine(self) -> Engine | None:
        engine = self.engine
        return engine if engine is not None and engine.ready_at is not None and self.ready.is_set() else None

    async def acquire_engine(self) -> Engine:
        """The hot engine; while there is none, wait in the bounded queue for a bounded time."""
        engine = self.ready_engine()
        if engine is not None:
            return engine
        if self.state == "failed":
            self.queue["rejected"] += 1
            raise Unavailable(f"the engine failed: {(self.failure or {}).get('reason', 'unknown')}")
        if self.queue["waiting"] >= self.settings.queue_max:
            self.queue["rejected"] += 1
            raise Unavailable(f"{self.queue['waiting']} requests are already waiting for the engine ({self.state})")
        self.queue["waiting"] += 1
        deadline = time.monotonic() + self.settings.queue_timeout_s
        try:
            while (engine := self.ready_engine()) is None:
                if self.state == "failed" or time.monotonic() > deadline or self.stop_requested:
                    self.queue["timed_out"] += 1
                    raise Unavailable(f"no engine became ready in time (state {self.state})")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.ready.wait(), timeout=min(1.0, max(0.01, deadline - time.monotonic())))
            return engine
        finally:
            self.queue["waiting"] -= 1

    def request_done(self) -> None:
        self.queue["served"] += 1

    def request_reload(self, why: str) -> None:
        log.info("reload requested (%s)", why)
        self.reload_reason = why
        self.wake.set()

    def request_stop(self, why: str) -> None:
        log.info("stop requested (%s)", why)
        self.stop_requested = True
        self.stopping_stages.set()
        self.wake.set()

    def status(self) -> dict[str, Any]:
        prepared = self.prepared
        engine = self.engine
        return {
            "state": self.state,
            "uptime_s": round(time.monotonic() - self.started, 1),
            "model": {
                "source": self.settings.model,
                "revision": self.settings.revision,
                "serving_dir": str(prepared.serving_dir) if prepared else None,
                "served_name": prepared.served_name if prepared else None,
            },
            "phases": self.phases,
            "progress": self.progress.snapshot() if self.state in PREPARING else None,
            "verification": prepared.verification if prepared else None,
            "residency": prepared.residency if prepared else None,
            "engine": None
            if engine is None
            else {**engine.status(), "restarts": self.restarts, "last_lines": list(engine.lines)[-20:] if self.failure else []},
            "failure": self.failure,
            "socket": str(self.settings.socket),
            "http": self.tcp.display if self.tcp else None,
            "handoff_socket": str(self.settings.handoff_path),
            "handoff": self.handoff.counts.as_dict() if self.handoff else None,
            "queue": dict(self.queue),
            "refused_clients": self.gateway.refused,
        }

    # -- life cycle ----------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum, action in ((signal.SIGTERM, self.request_stop), (signal.SIGINT, self.request_stop)):
            loop.add_signal_handler(signum, action, signal.Signals(signum).name)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload, "SIGHUP")
        tcp = self._tcp_listener()  # first: a port in use fails the start before a socket file exists
        public, handoff = self._listeners()
        self.runtime_dir = private_runtime_dir(runtime_root())
        await self.gateway.start(public, *([tcp] if tcp else []))
        self.handoff = HandoffServer(handoff, self.policy, self._handoff_target, log)
        await self.handoff.start()
        log.info("listening on %s (handoff %s)", self.settings.socket, self.settings.handoff_path)
        background = [asyncio.create_task(t) for t in (self._watchdog(), self._monitor(), self._report_start_up())]
        watcher = self._watch_source()
        try:
            await self._supervise()
        finally:
            for task in background:
                task.cancel()
            if watcher is not None:
                watcher.stop()
            await self._shutdown(public, handoff)
        return 0

    def _tcp_listener(self) -> socket.socket | None:
        if self.tcp is None:
            return None
        try:
            listener = self.tcp.bind()
        except OSError as exc:
            raise PrewarmError(
                f"cannot listen on {self.tcp.display}: {exc.strerror}",
                hint="pick another port with --http (or http in the config), or stop what uses this one",
            ) from None
        log.info("the chat page and the API: http://%s/", self.tcp.display)
        return listener

    def _listeners(self) -> tuple[Any, Any]:
        """The sockets systemd passed (a .socket unit, or its descriptor store after a restart),
        matched to the settings by the address they are bound to; the others bound here now and
        handed to systemd's descriptor store, so that the next start gets them back."""
        passed = listen_sockets(self.systemd)
        public = _take(passed, self.settings.socket, "public")
        handoff = _take(passed, self.settings.handoff_path, "handoff")
        if passed:
            name, sock = passed[0]
            raise ActivationError(
                f"systemd passed a socket ({name}, bound to {sock.getsockname()!r}) that is neither the socket "
                f"{self.settings.socket} nor the handoff socket {self.settings.handoff_path}",
                hint="make ListenStream= in qwen-prewarm.socket and socket/handoff_socket in the config name the same paths",
            )
        public = public or self._bind_own("public", self.settings.socket)
        return public, handoff or self._bind_own("handoff", self.settings.handoff_path)

    def _bind_own(self, name: str, path: Path) -> socket.socket:
        gid = grp.getgrnam(self.settings.socket_group).gr_gid if self.settings.socket_group else None
        sock = bind_unix(path, self.settings.socket_mode, gid)
        self.stored_sockets |= self.notifier.store_fd(name, sock.fileno())
        return sock

    def _handoff_target(self) -> tuple[Path, dict[str, object]] | None:
        engine = self.ready_engine()
        if engine is None:
            return None
        return engine.spec.socket, {"model": engine.spec.served_name, "engine": engine.id, "state": self.state}

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval()
        while interval:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def _report_start_up(self) -> None:
        """Until the first READY=1: the running stage's progress in systemd's status line, and
        systemd's start timeout (TimeoutStartSec=) kept ahead of a start-up that makes progress
        (bytes fetched, hashed or warmed, engine log lines), however long a first download takes;
        a start that stalls still times out."""
        last: tuple[Any, ...] | None = None
        while self.notifier.enabled and not self.ever_ready:
            engine = self.engine
            done = self.progress.snapshot()
            mark = (self.state, len(self.phases), done["done_bytes"], engine.line_count if engine else 0)
            if mark != last:
                self.notifier.extend_timeout(EXTEND_S)
                if self.state in PREPARING and done["total_bytes"]:
                    share = done["done_bytes"] / done["total_bytes"]
                    self.notifier.status(f"{self.state}: {share:.0%} of {format_size(done['total_bytes'])}")
                last = mark
            await asyncio.sleep(PROGRESS_INTERVAL_S)

    async def _prepare(self) -> Prepared:
        self.phases = []
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        progress = CancellableProgress(self.progress, self.stopping_stages)  # a 15 GB fetch stops at its next block
        prepared = await loop.run_in_executor(None, prepare, self.settings, self._on_phase, progress)
        if self.settings.lock:  # mlock(2): the weights stay resident whatever else needs memory
            held = await loop.run_in_executor(None, PageLock, prepared.serving_dir)
            old, self.page_lock = self.page_lock, held
            if old is not None:
                old.release()
            log.info("locked %d bytes of %s in memory", held.locked_bytes, prepared.serving_dir)
        log.info("weights ready in %.1f s: %s", time.monotonic() - started, prepared.serving_dir)
        return prepared

    def _on_phase(self, state: str, name: str, seconds: float | None) -> None:
        """Called from the preparing thread: at each phase's start (seconds None) and end."""
        if seconds is None:
            asyncio.run_coroutine_threadsafe(self._async_state(state), self.loop)
        else:
            self.phases.append({"name": name, "seconds": round(seconds, 3)})

    async def _async_state(self, state: str) -> None:
        self.set_state(state)

    async def _monitor(self) -> None:
        """While hot: re-warm weights that fell out of the page cache; notice files that changed on
        disk after they were verified (the engine keeps serving from memory: state degraded, and
        the next reload rebuilds or re-verifies them)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.settings.monitor_interval_s)
            prepared = self.prepared
            if prepared is None or self.state not in ("ready", "degraded"):
                continue
            changed = await loop.run_in_executor(None, _changed_files, prepared)
            if changed and self.state == "ready":
                log.error("files of %s changed on disk after verification: %s", prepared.serving_dir, ", ".join(changed[:5]))
                self.set_state("degraded", f"{len(changed)} files changed on disk since verified; reload to rebuild")
            if not changed:
                await loop.run_in_executor(None, self._rewarm, prepared)

    def _rewarm(self, prepared: Prepared) -> None:
        now = residency(prepared.serving_dir)
        if now.complete or now.unknown_bytes:
            return
        missing = now.total_bytes - now.resident_bytes
        log.info("%s: %d bytes fell out of the page cache; warming them again", prepared.serving_dir, missing)
        result = warm(prepared.serving_dir)
        self.prepared = dataclasses.replace(
            prepared, residency={**prepared.residency, "resident_bytes": result.after.resident_bytes, "rewarmed_at": time.time()}
        )

    def _watch_source(self) -> Any:
        """A watchdog observer on a local model source: a change asks for a reload (after 2 s quiet)."""
        source = Path(self.settings.model)
        if not self.settings.watch_source or not source.is_dir():
            return None
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        loop = asyncio.get_running_loop()
        pending: list[asyncio.TimerHandle] = []

        def later() -> None:
            self.request_reload(f"the model source {source} changed")

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                name = os.path.basename(os.fsdecode(event.src_path))
                if name.startswith(".") or event.event_type in ("opened", "closed_no_write"):
                    return  # our own records (.prewarm-*) and reads are not changes
                loop.call_soon_threadsafe(debounce)

        def debounce() -> None:
            for handle in pending:
                handle.cancel()
            pending[:] = [loop.call_later(2.0, later)]

        observer = Observer()
        observer.schedule(Handler(), str(source), recursive=False)
        observer.daemon = True
        observer.start()
        return observer

    async def _supervise(self) -> None:
        self.loop = asyncio.get_running_loop()
        while not self.stop_requested:
            if self.prepared is None or self.state in ("reloading", "degraded") or _changed_files(self.prepared):
                try:
                    self.prepared = await self._prepare()
                except Cancelled:  # by a stop: the stage ended at its next block, partial files kept
                    break
                except Exception as exc:
                    await self._fail(f"preparing the weights failed: {exc}", [])
                    continue
            # else: an engine restart after a death; the verified weights are unchanged on disk
            engine = await self._start_engine()
            if engine is None:
                continue
            await self._serve(engine)

    async def _start_engine(self, beside: Engine | None = None) -> Engine | None:
        """A new hot engine, or None. With ``beside`` (a blue-green reload), a new engine that cannot
        start leaves the old one serving; otherwise the state becomes failed."""
        assert self.prepared is not None and self.runtime_dir is not None
        self.set_state("starting")
        spec = EngineSpec(
            serving_dir=self.prepared.serving_dir,
            served_name=self.prepared.served_name,
            socket=self.runtime_dir / f"engine-{Engine.counter + 1}.sock",
            args=self.settings.engine_args,
            gpu=has_gpu() if self.settings.gpu is None else self.settings.gpu,
            cache_root=self.settings.cache_dir / "vllm",
            grace_s=self.settings.grace_s,
            split_cpu=self.settings.reload == "blue-green",
            python=self.settings.engine_python or sys.executable,
            load_format=self.settings.load_format,
            load_options=self.settings.load_options(),
            load_report=self.runtime_dir / f"engine-{Engine.counter + 1}.load.json",
        )
        missing = await self._missing_loader(spec)
        if missing:
            await self._start_failed(missing, [], beside)
            return None
        engine = Engine(spec, self.env)
        started = time.monotonic()
        await engine.start()
        try:
            if not await self._unless_stopped(engine.wait_ready(self.settings.startup_timeout_s, warmup=False)):
                await engine.stop()
                return None
            self.phases.append({"name": "engine_start", "seconds": round(time.monotonic() - started, 3)})
            warm_started = time.monotonic()
            if self.settings.warmup:
                await engine.wait_ready(60, warmup=True)
            self.phases.append({"name": "warmup", "seconds": round(time.monotonic() - warm_started, 3)})
        except EngineFailed as exc:
            await engine.stop()
            if beside is None:
                self.engine = engine
            await self._start_failed(exc.message, list(exc.lines), beside)
            return None
        return engine

    async def _start_failed(self, reason: str, lines: list[str], beside: Engine | None) -> None:
        """A new engine that cannot start: beside a serving one (a reload) that one keeps serving;
        otherwise the state becomes failed."""
        if beside is None:
            await self._fail(reason, lines)
            return
        log.error("reload failed, the old engine keeps serving: %s", reason)
        self.failure = {"reason": f"the last reload failed: {reason}", "last_lines": lines[-20:], "at": time.time()}

    async def _missing_loader(self, spec: EngineSpec) -> str | None:
        """Why vLLM cannot have --load-format prewarm: another Python (engine_python) may lack prewarm."""
        if spec.python == sys.executable or "prewarm" not in spec.load_args() or await has_prewarm_loader(spec.python):
            return None
        return (
            f"the engine's Python {spec.python} does not have prewarm installed, so vLLM there has no --load-format prewarm; "
            f'install prewarm into that environment, or set load_format = "auto"'
        )

    async def _unless_stopped(self, work: Any) -> bool:
        """Run ``work`` unless a stop comes first (then cancel it): True if it completed."""
        task = asyncio.create_task(work)
        while not task.done():
            if self.stop_requested:
                task.cancel()
                break
            await self._wait_for(task)
            if self.reload_reason is not None and not task.done():  # a reload during a start: handled once ready
                await asyncio.wait([task], timeout=0.5)
        try:
            await task
        except (asyncio.CancelledError, Cancelled):  # Cancelled: a stage in the executor, called off
            if self.stop_requested:
                return False
            raise
        return True

    async def _serve(self, engine: Engine, keep_failure: bool = False) -> None:
        """Hot until the engine dies, a reload is asked for, or the daemon stops."""
        self.engine = engine
        if not keep_failure:
            self.failure = None
        self.ready.set()
        self.set_state("ready", f"{engine.spec.served_name} on {self.settings.socket}{_load_note(engine.load_report())}")
        self.notifier.ready(f"ready: {engine.spec.served_name}")
        self.ever_ready = True
        died = asyncio.create_task(engine.wait())
        while True:
            if self.stop_requested:  # asked for while the engine was starting, or just now
                return
            if self.reload_reason is not None:
                await self._reload(engine)
                return
            if died.done() and not engine.stopping:
                self.ready.clear()
                await engine.stop()  # already gone: this closes its client session and socket file
                await self._death(engine, died.result())
                return
            await self._wait_for(died)

    async def _wait_for(self, task: asyncio.Task[Any]) -> None:
        """Until ``task`` is done or something wakes the supervisor (stop, reload)."""
        self.wake.clear()
        if self.stop_requested or self.reload_reason is not None:
            return
        waker = asyncio.create_task(self.wake.wait())
        await asyncio.wait([task, waker], return_when=asyncio.FIRST_COMPLETED)
        waker.cancel()

    async def _death(self, engine: Engine, status: int) -> None:
        """Any exit we did not ask for is a death, whatever the status (vLLM's server exits 0 when
        its engine core dies)."""
        now = time.monotonic()
        self.deaths.append(now)
        while self.deaths and now - self.deaths[0] > self.settings.restart_window_s:
            self.deaths.popleft()
        log.error(
            "engine %d (pid %s) died with status %d; last lines:\n  %s",
            engine.id,
            engine.pid,
            status,
            "\n  ".join(list(engine.lines)[-10:]),
        )
        if len(self.deaths) > self.settings.max_restarts:
            await self._fail(
                f"the engine died {len(self.deaths)} times in {self.settings.restart_window_s:.0f} s (last status {status})",
                list(engine.lines),
            )
            return
        self.restarts += 1
        backoff = min(60.0, self.settings.restart_backoff_s * 2 ** (len(self.deaths) - 1))
        self.set_state("starting", f"restarting the engine in {backoff:.1f} s (restart {self.restarts})")
        await self._sleep_unless_woken(backoff)

    async def _fail(self, reason: str, lines: list[str]) -> None:
        """State failed: keep answering 503 with the reason until a reload (or stop) comes."""
        self.ready.clear()
        self.failure = {"reason": reason, "last_lines": lines[-20:], "at": time.time()}
        self.set_state("failed", reason)
        log.error("%s", reason)
        self.reload_reason = None
        while not self.stop_requested and self.reload_reason is None:
            self.wake.clear()
            await self.wake.wait()
        self.deaths.clear()
        if self.reload_reason:
            self.notifier.reloading()
            self.set_state("reloading", self.reload_reason)
            self.reload_reason = None

    async def _sleep_unless_woken(self, seconds: float) -> None:
        self.wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), seconds)

    async def _reload(self, old: Engine) -> None:
        """Blue-green: prepare and start a new engine beside the old, switch, drain, stop the old.
        With reload = "restart", stop the old first (one engine's memory); requests queue meanwhile."""
        why, self.reload_reason = self.reload_reason, None
        self.notifier.reloading()
        self.set_state("reloading", why or "")
        if self.settings.reload == "restart":
            self.ready.clear()
            await old.stop()
        try:
            self.prepared = await self._prepare()
        except Exception as exc:
            if self.settings.reload != "restart":
                self.set_state("ready", f"reload failed, still serving the old engine: {exc}")
                log.error("reload failed, the old engine keeps serving: %s", exc)
                await self._serve(old)
                return
            await self._fail(f"preparing the weights failed: {exc}", [])
            return
        new = await self._start_engine(beside=None if self.settings.reload == "restart" else old)
        if new is None:
            if self.settings.reload != "restart" and not self.stop_requested:
                self.set_state("ready", "the reload failed; still serving the old engine")
                await self._serve(old, keep_failure=True)
            return
        self.engine = new  # new requests go to the new engine from here on
        if self.settings.reload != "restart":
            await self._drain(old)
        await self._serve(new)

    async def _drain(self, old: Engine) -> None:
        deadline = time.monotonic() + self.settings.grace_s
        while old.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        cut = old.in_flight
        await old.stop()
        log.info("engine %d stopped after the switch (%d requests cut)", old.id, cut)
        prepared = self.prepared
        if prepared is not None and prepared.owned and old.spec.serving_dir != prepared.serving_dir:
            log.info("removing %s: the engine that used it is gone", old.spec.serving_dir)
            await asyncio.get_running_loop().run_in_executor(None, shutil.rmtree, old.spec.serving_dir, True)

    async def _shutdown(self, public: Any, handoff: Any) -> None:
        self.set_state("stopping")
        self.notifier.stopping()
        self.ready.clear()
        if self.handoff is not None:
            await self.handoff.close()
        await self.gateway.stop()  # stops accepting, then lets in-flight requests finish (grace_s)
        if self.engine is not None:
            await self.engine.stop()
        if not self.stored_sockets:  # else systemd keeps them listening for the next start
            remove_unix(self.settings.socket, public)
            remove_unix(self.settings.handoff_path, handoff)
        if self.runtime_dir is not None:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
        if self.page_lock is not None:
            self.page_lock.release()
        log.info("stopped")


def _take(passed: list[tuple[str, Any]], path: Path, name: str) -> Any:
    """The passed socket bound to ``path`` (or, failing that, named ``name``), removed from ``passed``."""
    by_address = [i for i, (_, sock) in enumerate(passed) if sock.getsockname() == str(path)]
    by_name = [i for i, (fd_name, _) in enumerate(passed) if fd_name == name]
    found = by_address or by_name
    return passed.pop(found[0])[1] if found else None


def _changed_files(prepared: Prepared) -> list[str]:
    changed = []
    for name, identity in prepared.identities.items():
        try:
            st = os.stat(prepared.serving_dir / name)
        except OSError:
            changed.append(name)
            continue
        if (st.st_size, st.st_mtime_ns, st.st_ino) != identity:
            changed.append(name)
    return changed


def run_daemon(settings: DaemonSettings, env: dict[str, str], systemd: dict[str, str]) -> int:
    return asyncio.run(Daemon(settings, env, systemd).run())


def _load_note(report: dict[str, Any] | None) -> str:
    """What the prewarm load format reported, for the log and systemd's status line."""
    try:
        size, seconds = format_size(int(report["bytes"])), float(report["seconds"])  # type: ignore[index]
        how = "every byte hashed" if report["hashed"] else "unchanged since verified"  # type: ignore[index]
    except (TypeError, KeyError, ValueError):
        return ""
    return f" (weights: {size} in {seconds:.2f} s, {how})"
