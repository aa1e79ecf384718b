"""``python -m prewarm.reaper GRACE_S -- CMD ...``: run the engine so that no process of it outlives us.

vLLM's API server spawns engine-core and worker processes. A parent-death signal alone covers
only the direct child, so the daemon starts this small process (no torch, no vLLM) between itself
and the engine. It is a child subreaper (prctl(2) PR_SET_CHILD_SUBREAPER: orphaned descendants
are reparented to it, not to init), gets SIGTERM when the daemon dies for any reason, SIGKILL
included (PR_SET_PDEATHSIG), and then stops the engine's whole process group, waits a grace
period, kills what is left and reaps every descendant before it exits with the engine's status.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option})")


def _descendants() -> list[int]:
    """Every process whose parent is us (orphans of the engine land here: we are a subreaper)."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == me:
                found.append(int(entry))
    return found


def _stop_everything(child: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the engine's process group, then SIGKILL it and every descendant left, reap all."""
    for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signum)
        for pid in _descendants():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and (_reap_any() or _descendants()):
            time.sleep(0.05)
        if not _descendants():
            return


def _reap_any() -> bool:
    """Reap exited descendants; True while some are still running."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True


_stop_requested = False


def _request_stop(signum: int, frame: object) -> None:
    global _stop_requested
    _stop_requested = True


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m prewarm.reaper GRACE_SECONDS -- COMMAND [ARG...]", file=sys.stderr)
        return 2
    grace, argv = float(argv[0]), argv[1:]
    daemon = os.getppid()
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    signal.signal(signal.SIGTERM, _request_stop)
    signal.signal(signal.SIGINT, _request_stop)
    if os.getppid() != daemon:  # the daemon died before the death signal was armed
        return 1
    # Its own process group, so killpg reaches its workers; and it dies if we are SIGKILLed.
    child = subprocess.Popen(argv[1:], process_group=0, preexec_fn=lambda: _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL))
    while not _stop_requested and child.poll() is None:
        time.sleep(0.1)
    status = child.poll()
    _stop_everything(child, grace if _stop_requested else 0.0)
    if status is None:
        status = child.wait()
    return status if status >= 0 else 128 - status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
