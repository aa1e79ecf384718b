"""The ``prewarm`` command: thin click commands over the stages; the only module that prints."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from prewarm import __version__
from prewarm.checkpoint import MANIFEST_NAME
from prewarm.config import debug_enabled, default_socket
from prewarm.errors import ExitCode, PrewarmError, UsageError
from prewarm.fsutil import os_error
from prewarm.progress import BarProgress, NoProgress, PlainProgress, Progress
from prewarm.units import format_size, parse_size


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so ``finally`` blocks clean up as for Ctrl-C."""


@dataclasses.dataclass
class Context:
    quiet: bool
    debug: bool
    as_json: bool = False  # set by a command's --json: errors then go to stdout as JSON too

    def progress(self, as_json: bool = False) -> Progress:
        if self.quiet:
            return NoProgress()
        if sys.stderr.isatty() and not as_json:
            return BarProgress()
        return PlainProgress()


_DEFAULT_HINTS = {
    ExitCode.USAGE: "see `prewarm COMMAND --help`",
    ExitCode.BAD_INPUT: "the input is damaged or not what prewarm expects: check it, or produce it again",
    ExitCode.IO: "check the path, its permissions and the free space",
    ExitCode.LIMIT: "raise the limit named above",
}


def _fail(error: PrewarmError, as_json: bool = False) -> NoReturn:
    hint = error.hint or _DEFAULT_HINTS.get(error.exit_code, "run again with --debug to see where it failed")
    click.echo(f"Error: {show(str(error))}", err=True)
    click.echo(f"  hint: {show(hint)}", err=True)
    if as_json:
        fields = {"message": error.message, "path": error.path, "hint": hint, "exit_code": int(error.exit_code)}
        doc = {"ok": False, "error": fields}
        click.echo(json.dumps(doc, indent=2))
    sys.exit(int(error.exit_code))


def show(text: str) -> str:
    """``text`` for a terminal: a name with a newline, a control character or bytes that are not
    UTF-8 is shown escaped (``\\n``, ``\\xff``), so it cannot forge or garble a line."""
    if text.isprintable() and _is_utf8(text):
        return text
    return os.fsencode(text).decode("utf-8", "backslashreplace").encode("unicode_escape").decode("ascii").replace("\\\\x", "\\x")


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _sigterm(signum: int, frame: object) -> NoReturn:
    raise _Terminated()


class PrewarmGroup(click.Group):
    """Turns PrewarmError into one line and an exit code; tracebacks only with --debug."""

    def invoke(self, ctx: click.Context) -> Any:
        debug = debug_enabled() or "--debug" in sys.argv[1:]

        def as_json() -> bool:
            return isinstance(ctx.obj, Context) and ctx.obj.as_json

        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            _quiet_broken_pipe()
        except PrewarmError as error:
            if debug:
                raise
            _fail(error, as_json())
        except OSError as error:  # the filesystem said no somewhere we did not expect
            if debug:
                raise
            _fail(os_error(error, error.filename or ""), as_json())
        except (KeyboardInterrupt, _Terminated):
            if ctx.invoked_subcommand == "fetch":
                click.echo("Interrupted: partial downloads are kept; the same command resumes them.", err=True)
            else:
                click.echo("Interrupted: nothing was left half-written.", err=True)
            sys.exit(int(ExitCode.INTERRUPTED))
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as error:  # a bug: still one line, and the way to the traceback
            if debug:
                raise
            message = f"internal error: {type(error).__name__}: {error}"
            hint = "this is a bug in prewarm: run again with --debug and report the traceback"
            _fail(PrewarmError(message, hint=hint, exit_code=ExitCode.INTERNAL), as_json())


def _quiet_broken_pipe() -> NoReturn:
    """The reader of our output went away (`prewarm verify DIR | head -1`): stop quietly, as Unix
    tools do, with the status a shell shows for SIGPIPE (128 + 13)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # Python would otherwise report the failed flush at exit
    sys.exit(int(ExitCode.BROKEN_PIPE))


@click.group(cls=PrewarmGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="prewarm")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@click.option("--debug", is_flag=True, help="Show tracebacks (also PREWARM_DEBUG=1).")
@click.pass_context
def main(ctx: click.Context, quiet: bool, debug: bool) -> None:
    """Prepare model weights for instant, hot LLM serving."""
    ctx.obj = Context(quiet=quiet, debug=debug)
    signal.signal(signal.SIGTERM, _sigterm)
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING, stream=sys.stderr, format="%(levelname)s: %(message)s", force=True
    )


def _emit(as_json: bool, data: dict[str, Any], human: Callable[[], None]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2))  # a name that is not UTF-8 comes out as \\udcXX escapes: os.fsencode restores it
    else:
        human()


def _skipped_json(skipped: Any) -> list[dict[str, str]]:
    return [{"name": s.name, "reason": s.reason} for s in skipped]


def _warn_skipped(skipped: Any, what: str) -> None:
    """One stderr line per entry that was not opened (a FIFO, a socket, a symlink leading outside)."""
    for s in skipped:
        click.echo(f"WARNING: {what}: {show(s.name)}: {s.reason}", err=True)


def _remember_json(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    context = ctx.find_object(Context)
    if context is not None:
        context.as_json = value
    return value


_json_flag = click.option(
    "--json", "as_json", is_flag=True, callback=_remember_json, is_eager=True, help="Print a machine-readable summary on stdout."
)


class _PathArg(click.Path):
    """A path that may not be empty: `prewarm verify "$UNSET"` must not mean the current directory."""

    def __init__(self) -> None:
        super().__init__(path_type=Path)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and value.strip() == "":
            self.fail("an empty path was given (is a shell variable unset?)", param, ctx)
        return super().convert(value, param, ctx)


PATH = _PathArg()
_threads = click.option("--threads", type=click.IntRange(1, 256), default=None, help="Reader threads (default: one per CPU).")


@main.command()
@click.argument("source")
@click.argument("destination", type=PATH)
@click.option(
    "--max-shard-size",
    "max_size",
    default="5GB",
    show_default=True,
    metavar="SIZE",
    help="Largest file to write, header included: 5GB, 4.5GiB, 500MB or bytes.",
)
@click.option("--revision", default="main", show_default=True, help="With a hub repo id as SOURCE: what to fetch.")
@_json_flag
@click.pass_obj
def reshard(obj: Context, source: str, destination: Path, max_size: str, revision: str, as_json: bool) -> None:
    """Rewrite the checkpoint SOURCE as shards of at most SIZE in the new directory DESTINATION.

    SOURCE is a model directory (shards with or without model.safetensors.index.json, or one
    model.safetensors), a single .safetensors file, or a hub repo id (owner/name), fetched first.
    DESTINATION gets the shards, the index, the model's other files and prewarm.manifest.json,
    all at once or not at all.
    """
    from prewarm.fetch import REPO_ID, fetch
    from prewarm.reshard import reshard as run

    if source.strip() == "":
        raise UsageError("an empty SOURCE was given (is a shell variable unset?)", hint="name a checkpoint or a hub repo id")
    limit = parse_size(max_size)
    source_path, source_info = Path(source), None
    if REPO_ID.fullmatch(source) and not os.path.lexists(source):  # only a literal owner/name, never ./a/b
        fetched = fetch(source, revision, progress=obj.progress(as_json))
        _say_fetched(fetched)
        source_path, source_info = fetched.directory, fetched.source_info()
    result = run(source_path, destination, limit, obj.progress(as_json), source_info)
    data = dataclasses.asdict(result) | {"destination": str(result.destination)}
    data["shards"] = [{"file": n, "bytes": b, "tensors": t} for n, b, t in result.shards]
    data["refused_files"] = _skipped_json(result.refused_files)

    def human() -> None:
        t = result.timings
        click.echo(
            f"Wrote {show(str(result.destination))}: {_plural(len(result.shards), 'shard')}, {format_size(result.bytes_written)}"
            f" in {t['total']:.1f} s (plan {t['plan']:.2f} s, copy {t['copy']:.1f} s, "
            f"sync {t['sync']:.1f} s)"
        )
        for name, size, tensors in result.shards:
            click.echo(f"  {name}  {format_size(size):>10}  {_plural(tensors, 'tensor')}")
        if result.copied_files:
            click.echo(f"  copied: {', '.join(map(show, result.copied_files))}")
        if result.skipped_files:
            skipped = ", ".join(map(show, result.skipped_files))
            click.echo(f"  not copied (other weight formats, unindexed shards, subdirectories): {skipped}")

    _warn_skipped(result.refused_files, "not copied")
    _emit(as_json, data, human)


@main.command()
@click.argument("repo_id")
@click.option("--revision", default="main", show_default=True, help="Branch, tag or commit to fetch.")
@click.option(
    "--dest",
    type=PATH,
    default=None,
    help="Directory to fetch into (default: $PREWARM_CACHE/hub/OWNER--NAME/COMMIT).",
)
@click.option(
    "--include",
    multiple=True,
    metavar="GLOB",
    help="Files to fetch (repeatable). Default: safetensors weights, JSON configs, tokenizer files, chat "
    "template, generation config. Pickled weights (*.bin, *.pt, *.pth) are never fetched unless named "
    "here: loading a pickle can run arbitrary code.",
)
@_json_flag
@click.pass_obj
def fetch(obj: Context, repo_id: str, revision: str, dest: Path | None, include: tuple[str, ...], as_json: bool) -> None:
    """Download REPO_ID from the Hugging Face hub, pinned to the commit REVISION resolves to.

    Downloads only what is missing or damaged, resumes partial files, checks every file against
    the hub's size and sha256 (or git blob id) before use, and works offline from what it has
    (HF_HUB_OFFLINE=1 or no connection). Honours HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE.
    """
    from prewarm.fetch import fetch as run

    result = run(repo_id, revision, dest, include or None, obj.progress(as_json))
    data = {
        "repo_id": result.repo_id,
        "revision": result.revision,
        "commit": result.commit,
        "directory": str(result.directory),
        "files": [f.name for f in result.files],
        "downloaded": list(result.downloaded),
        "bytes_downloaded": result.bytes_downloaded,
        "offline_reason": result.offline_reason,
        "skipped_pickles": list(result.skipped_pickles),
        "skipped_reserved": list(result.skipped_reserved),
        "seconds": round(result.seconds, 3),
    }
    _emit(as_json, data, lambda: _say_fetched(result, err=False))


def _say_fetched(result: Any, err: bool = True) -> None:
    what = (
        f"downloaded {len(result.downloaded)} files ({format_size(result.bytes_downloaded)})"
        if result.downloaded
        else "nothing to download"
    )
    click.echo(
        f"{result.repo_id}@{result.revision} = {result.commit} in {result.directory}: "
        f"{len(result.files)} files, {what}, {result.seconds:.2f} s",
        err=err,
    )
    if result.offline_reason:
        click.echo(f"  offline ({result.offline_reason}): using the files fetched before, checked by size", err=err)
    if result.skipped_pickles:
        click.echo(f"  not fetched (pickles; name them with --include to fetch): {', '.join(result.skipped_pickles)}", err=err)
    if result.skipped_reserved:
        names = ", ".join(map(show, result.skipped_reserved))
        click.echo(f"  not fetched (prewarm's own file names, which a repo may not supply): {names}", err=err)


@main.command()
@click.argument("directory", type=PATH)
@_threads
@click.option("--warm", "also_warm", is_flag=True, help="Also leave every file resident in the page cache (one read).")
@_json_flag
@click.pass_obj
def verify(obj: Context, directory: Path, threads: int | None, also_warm: bool, as_json: bool) -> None:
    """Check every byte of DIRECTORY against its prewarm.manifest.json.

    Exits 0 when everything matches, 1 naming each missing, extra, resized or corrupted file
    (with the byte range of each bad chunk). Reading the bytes loads them into the page cache,
    so with --warm verifying and warming cost one read, not two.
    """
    from prewarm.verify import record_verification, verify_directory

    report = verify_directory(directory, threads, obj.progress(as_json))
    problems = [{k: v for k, v in dataclasses.asdict(p).items() if v not in (None, "")} for p in report.problems]
    data: dict[str, Any] = {
        "ok": report.ok,
        "problems": problems,
        "files": report.files,
        "bytes_checked": report.bytes_checked,
        "seconds": round(report.seconds, 3),
    }
    warmed = _warm_after_verify(obj, directory, threads, as_json, data) if also_warm and report.ok else None

    def human() -> None:
        for p in report.problems:
            where = f" bytes {p.offset}-{p.offset + p.length - 1}" if p.offset is not None and p.length else ""
            detail = f" ({show(p.detail)})" if p.detail else ""
            click.echo(f"{p.kind:<10} {show(p.file)}{where}{detail}")
        rate = report.bytes_checked / max(report.seconds, 1e-9)
        state = "OK" if report.ok else f"FAILED: {_plural(len(report.problems), 'problem')}"
        click.echo(
            f"{state}: {_plural(report.files, 'file')}, {format_size(report.bytes_checked)} checked in "
            f"{report.seconds:.2f} s ({format_size(rate)}/s)"
        )
        if warmed is not None:
            click.echo(f"Resident: {_percent(warmed.after)} ({format_size(warmed.bytes_read)} more read)")

    _emit(as_json, data, human)
    sys.stdout.flush()
    try:
        record_verification(report)
    except PrewarmError as error:  # the check's result is out; not being able to note it is a warning
        click.echo(f"WARNING: could not record the result for `prewarm status`: {show(str(error))}", err=True)
    if not report.ok or (warmed is not None and not warmed.after.complete):
        sys.exit(int(ExitCode.CHECK_FAILED))


def _warm_after_verify(obj: Context, directory: Path, threads: int | None, as_json: bool, data: dict[str, Any]) -> Any:
    from prewarm.warm import warm as run_warm

    result = run_warm(directory, threads, obj.progress(as_json))
    data["warm"] = _warm_json(result)
    return result


def _percent(residency: Any) -> str:
    """Resident share of what can be measured; files of unknown residency are said to be so."""
    known = residency.total_bytes - residency.unknown_bytes
    share = residency.resident_bytes / known if known else 1.0
    text = f"{format_size(residency.resident_bytes)} of {format_size(known)} ({share:.0%})"
    if residency.unknown_bytes:
        text += f"; {format_size(residency.unknown_bytes)} of unknown residency ({_UNKNOWN})"
        if not known:
            text = f"{format_size(residency.unknown_bytes)} of unknown residency ({_UNKNOWN})"
    return text


_UNKNOWN = "the kernel reports page-cache residency only to the files' owner or a user who may write them"


def _residency_json(residency: Any) -> dict[str, Any]:
    return {
        "total_bytes": residency.total_bytes,
        "resident_bytes": residency.resident_bytes,
        "unknown_bytes": residency.unknown_bytes,
        "files": [{"name": f.name, "bytes": f.bytes, "resident_bytes": f.resident_bytes} for f in residency.files],
        "skipped": _skipped_json(residency.skipped),
    }


def _warm_json(result: Any) -> dict[str, Any]:
    return {
        "bytes_read": result.bytes_read,
        "seconds": round(result.seconds, 3),
        "already_resident_bytes": result.before.resident_bytes,
        "budget": result.budget,
        "limited_by_memory": result.limited_by_memory,
        "complete": result.after.complete,
        **_residency_json(result.after),
    }


@main.command()
@click.argument("directory", type=PATH)
@click.option("--lock", is_flag=True, help="Then keep the files resident (mlock) until Ctrl-C or SIGTERM.")
@click.option(
    "--budget", metavar="SIZE", default=None, help="Most bytes to add to the page cache (default: available memory less a tenth)."
)
@_threads
@_json_flag
@click.pass_obj
def warm(obj: Context, directory: Path, lock: bool, budget: str | None, threads: int | None, as_json: bool) -> None:
    """Load every file of DIRECTORY into the page cache, skipping what is already resident.

    Exits 0 only when every file is resident afterwards. When the files do not fit in memory it
    says so first and warms what fits, in model order (exit 1). With --lock it then holds the
    files in memory (mlock) until interrupted; it checks the lock limit (ulimit -l) first.
    """
    from prewarm.warm import PageLock
    from prewarm.warm import warm as run_warm

    result = run_warm(directory, threads, obj.progress(as_json), parse_size(budget) if budget is not None else None)
    data = _warm_json(result)
    _warn_skipped(result.after.skipped, "not warmed")

    def human() -> None:
        rate = result.bytes_read / max(result.seconds, 1e-9)
        click.echo(
            f"Warmed {show(str(directory))}: read {format_size(result.bytes_read)} in {result.seconds:.2f} s "
            f"({format_size(rate)}/s); {format_size(result.before.resident_bytes)} was already resident; "
            f"now {_percent(result.after)} resident"
        )

    if not lock or not result.after.complete:
        _emit(as_json, data, human)
        if not result.after.complete or result.after.skipped:
            sys.exit(int(ExitCode.CHECK_FAILED))
        return
    with PageLock(directory, obj.progress(as_json)) as held:
        data["locked_bytes"] = held.locked_bytes
        _emit(as_json, data, human)
        click.echo(
            f"Locked {format_size(held.locked_bytes)} in memory (pid {os.getpid()}); Ctrl-C or SIGTERM releases it", err=True
        )
        sys.stdout.flush()
        try:
            while True:
                signal.pause()
        except (KeyboardInterrupt, _Terminated):
            click.echo("Released.", err=True)


class _SocketPath(_PathArg):
    """A socket's path, not checked for reading: whether this user may connect is for the client to say."""

    def __init__(self) -> None:
        click.Path.__init__(self, path_type=Path, readable=False)


_socket_option = click.option(
    "--socket",
    "socket_path",
    type=_SocketPath(),
    default=None,
    help="The daemon's public socket (default: $PREWARM_SOCKET, else /run/qwen-prewarm/api.sock).",
)


@main.command()
@click.argument("directory", type=PATH, required=False)
@_socket_option
@_json_flag
def status(directory: Path | None, socket_path: Path | None, as_json: bool) -> None:
    """Show the daemon's state (no DIRECTORY, or --socket), or how much of DIRECTORY is in the page cache.

    The daemon's: its state, model, each phase with its seconds, engine, queue and residency
    (--json: the status JSON as the daemon sends it); exit 1 when its state is failed. A
    DIRECTORY's: per file, how much is resident (mincore), and when it was last verified.
    """
    from prewarm.verify import last_verification
    from prewarm.warm import residency

    if directory is None or socket_path is not None:
        if directory is not None:
            raise UsageError(
                "give a DIRECTORY or --socket, not both", hint="`prewarm status DIR` or `prewarm status --socket PATH`"
            )
        _daemon_status(socket_path or default_socket(), as_json)
        return
    res = residency(directory)  # first: reading the manifest below must not change what is measured
    record = last_verification(directory)
    has_manifest = any(f.name == MANIFEST_NAME for f in res.files)
    verified = (
        None
        if record is None
        else {
            "verified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.verified_at)),
            "ok": record.ok,
            "problems": record.problems,
            "manifest_changed": record.manifest_changed,
        }
    )
    data = _residency_json(res) | {"manifest": has_manifest, "last_verification": verified}
    _warn_skipped(res.skipped, "not measured")

    def human() -> None:
        names = [show(f.name) for f in res.files]
        width = max(map(len, names), default=4)
        for name, f in zip(names, res.files, strict=True):
            if f.resident_bytes is None:
                click.echo(f"{name:<{width}}  {format_size(f.bytes):>10}  unknown residency")
            else:
                click.echo(f"{name:<{width}}  {format_size(f.bytes):>10}  {f.resident_bytes / (f.bytes or 1):>5.0%} resident")
        click.echo(f"{'total':<{width}}  {format_size(res.total_bytes):>10}  {_percent(res)}")
        click.echo(f"manifest: {_verification_line(has_manifest, verified)}")

    _emit(as_json, data, human)


def _verification_line(has_manifest: bool, verified: dict[str, Any] | None) -> str:
    if not has_manifest:
        return "none (run `prewarm manifest DIR`)"
    if verified is None:
        return "never verified"
    outcome = "OK" if verified["ok"] else _plural(verified["problems"], "problem")
    changed = "; the manifest has changed since" if verified["manifest_changed"] else ""
    return f"last verified {verified['verified_at']}: {outcome}{changed}"


@main.command()
@click.argument("directory", type=PATH)
@_json_flag
def evict(directory: Path, as_json: bool) -> None:
    """Drop DIRECTORY's files from the page cache (no root needed), e.g. to measure a cold start."""
    from prewarm.warm import evict as run_evict

    before, after = run_evict(directory)
    data = {"before": _residency_json(before), "after": _residency_json(after)}
    _warn_skipped(after.skipped, "not evicted")

    def human() -> None:
        click.echo(f"Evicted {show(str(directory))}: {_percent(before)} -> {_percent(after)} resident")
        if after.resident_bytes:
            click.echo("  what stayed is mapped or locked by another process (a running engine, `warm --lock`)")

    _emit(as_json, data, human)


@main.command()
@click.argument("directory", type=PATH)
@_threads
@_json_flag
@click.pass_obj
def manifest(obj: Context, directory: Path, threads: int | None, as_json: bool) -> None:
    """Write DIRECTORY/prewarm.manifest.json for a directory prewarm did not produce.

    Hashes every file (hidden ones excepted) so that `prewarm verify` can check it later.
    """
    from prewarm.manifest import build_manifest, write_manifest

    started = time.perf_counter()
    built = build_manifest(directory, threads, obj.progress(as_json))
    result = built.manifest
    write_manifest(directory, result, built.mode)
    path = directory / MANIFEST_NAME
    seconds = time.perf_counter() - started
    data = {
        "manifest": str(path),
        "files": len(result.files),
        "bytes": result.total_bytes,
        "seconds": round(seconds, 3),
        "skipped": _skipped_json(built.skipped),
    }
    _warn_skipped(built.skipped, "not in the manifest")
    _emit(
        as_json,
        data,
        lambda: click.echo(
            f"Wrote {show(str(path))}: {_plural(len(result.files), 'file')}, "
            f"{format_size(result.total_bytes)} hashed in {seconds:.2f} s"
        ),
    )


@main.command()
@click.option("--config", "config_file", type=PATH, default=None, help="TOML settings (systemd/qwen-prewarm.toml has them all).")
@click.option("--model", default=None, help="Hub repo id (owner/name) or model directory to serve.")
@click.option("--revision", default=None, help="With a hub repo id: branch, tag or commit.")
@click.option("--socket", "socket_path", type=PATH, default=None, help="The public Unix socket (HTTP, OpenAI API).")
@click.option("--handoff-socket", type=PATH, default=None, help="Default: the socket's path + .handoff.")
@click.option("--served-model-name", default=None, help="The model name clients use (default: repo id or directory name).")
@click.option("--engine-arg", "engine_args", multiple=True, metavar="ARG", help="An option for vLLM, passed as is (repeatable).")
@click.option("--cache-dir", type=PATH, default=None, help="Where serving directories and vLLM's caches go.")
@click.option(
    "--reload", "reload_mode", type=click.Choice(["blue-green", "restart"]), default=None, help="How a reload swaps engines."
)
@click.option("--http", default=None, metavar="HOST:PORT", help="Also serve the chat page and API over TCP.")
def daemon(
    config_file: Path | None,
    model: str | None,
    revision: str | None,
    socket_path: Path | None,
    handoff_socket: Path | None,
    served_model_name: str | None,
    engine_args: tuple[str, ...],
    cache_dir: Path | None,
    reload_mode: str | None,
    http: str | None,
) -> None:
    """Serve a model hot: prepare its weights, run a vLLM engine, answer on a Unix socket.

    The socket is bound first, so clients can connect at once; their requests wait until the
    engine is ready. SIGHUP or POST /prewarm/reload swaps in a fresh engine; SIGTERM stops.
    """
    from prewarm.config import engine_environment, load_settings, systemd_environment
    from prewarm.daemon import run_daemon

    flags = {
        "model": model,
        "revision": revision,
        "socket": socket_path,
        "handoff_socket": handoff_socket,
        "served_model_name": served_model_name,
        "engine_args": engine_args,
        "cache_dir": cache_dir,
        "reload": reload_mode,
        "http": http,
    }
    settings = load_settings(config_file, flags)
    logging.getLogger("prewarm").setLevel(logging.INFO)
    sys.exit(run_daemon(settings, engine_environment(), systemd_environment()))


_root_option = click.option(
    "--root",
    type=PATH,
    default=None,
    help="Work on the files under this directory (like systemctl --root): no useradd, groupadd, chown or systemctl.",
)
_dry_run_option = click.option("--dry-run", is_flag=True, help="Print what would be done; change nothing.")


@main.command("install-service")
@_root_option
@click.option("--model", default=None, help="The model of a new config (an existing config is never changed).")
@_dry_run_option
@_json_flag
def install_service(root: Path | None, model: str | None, dry_run: bool, as_json: bool) -> None:
    """Install the qwen-prewarm systemd service (needs root).

    Creates the system user prewarm and the group prewarm-clients, writes
    /etc/prewarm/qwen-prewarm.toml when it does not exist, writes qwen-prewarm.service (running
    this prewarm) and qwen-prewarm.socket into /etc/systemd/system, and reloads systemd. A second
    run changes nothing.
    """
    from prewarm.install import install_service as run

    result = run(root, model, dry_run)
    _emit(as_json, _service_json(result), lambda: _say_service(result, "installed"))


@main.command("uninstall-service")
@_root_option
@click.option("--purge", is_flag=True, help="Also remove the config, /var/lib/qwen-prewarm and /var/cache/qwen-prewarm.")
@_dry_run_option
@_json_flag
def uninstall_service(root: Path | None, purge: bool, dry_run: bool, as_json: bool) -> None:
    """Stop, disable and remove the qwen-prewarm units (needs root).

    Keeps the config, the weights and the user unless --purge; even then only regular files and
    real directories are removed, never what a symlink leads to.
    """
    from prewarm.install import uninstall_service as run

    result = run(root, purge, dry_run)
    _emit(as_json, _service_json(result), lambda: _say_service(result, "uninstalled"))


_PAST = {"create": "created", "write": "wrote", "remove": "removed", "run": "ran"}


def _service_json(result: Any) -> dict[str, Any]:
    steps = [{"action": s.action, "target": s.target, "detail": s.detail, "changed": s.changed} for s in result.steps]
    doc = {"ok": True, "root": str(result.root), "dry_run": result.dry_run, "changed": result.changed, "steps": steps}
    return doc | {"notes": list(result.notes), "next": list(result.next_steps)}


def _say_service(result: Any, done: str) -> None:
    if result.dry_run:
        head = "dry run, nothing changed" if result.changed else "nothing to change"
    else:
        head = done if result.changed else f"nothing changed: already {done}"
    click.echo(f"qwen-prewarm under {show(str(result.root))}: {head}")
    for step in result.steps:
        verb = (f"would {step.action}" if result.dry_run else _PAST[step.action]) if step.changed else "kept"
        detail = f" ({show(step.detail)})" if step.detail else ""
        click.echo(f"  {verb:<14} {show(step.target)}{detail}")
    for note in result.notes:
        click.echo(f"note: {show(note)}")
    if result.next_steps:
        click.echo("next:")
        for command in result.next_steps:
            click.echo(f"  {command}")


_STATE_WORDS = {
    "fetching": "downloading the weights from the hub",
    "resharding": "resharding the weights",
    "verifying": "verifying the weights",
    "warming": "reading the weights into the page cache",
    "starting": "the vLLM engine is starting",
    "reloading": "preparing a new engine",
}


def _daemon_status(socket: Path, as_json: bool) -> None:
    from prewarm.ask import daemon_status

    status = daemon_status(socket)
    _emit(as_json, status, lambda: _say_daemon_status(socket, status))
    if status["state"] == "failed":
        sys.exit(int(ExitCode.CHECK_FAILED))


def _say_load(engine: dict[str, Any]) -> None:
    load = engine.get("load")
    if not isinstance(load, dict):
        return
    try:
        how = "every byte hashed" if load.get("hashed") else "unchanged since verified, not hashed"
        click.echo(
            f"weights:   {format_size(int(load['bytes']))} in {float(load['seconds']):.2f} s "
            f"({float(load['gb_per_s']):.2f} GB/s, --load-format prewarm, {how})"
        )
    except (KeyError, TypeError, ValueError):
        return


def _say_daemon_status(socket: Path, status: dict[str, Any]) -> None:
    """The status JSON for people; every string from the socket goes through show()."""
    model = status.get("model") or {}
    click.echo(f"state:     {show(str(status['state']))} (daemon up {_seconds(status.get('uptime_s'))}) on {show(str(socket))}")
    name = f', served as "{show(str(model["served_name"]))}"' if model.get("served_name") else ""
    serving = f" from {show(str(model['serving_dir']))}" if model.get("serving_dir") else ""
    click.echo(f"model:     {show(str(model.get('source')))}{name}{serving}")
    phases = status.get("phases") or []
    click.echo("phases:" if phases else "phases:    none done yet")
    width = max((len(show(str(p.get("name")))) for p in phases), default=0)
    for p in phases:
        click.echo(f"  {show(str(p.get('name'))):<{width}}  {float(p.get('seconds') or 0):9.2f} s")
    if phases:
        click.echo(f"  {'total':<{width}}  {sum(float(p.get('seconds') or 0) for p in phases):9.2f} s")
    stage = status.get("progress") or {}
    if stage.get("total_bytes"):
        done, total = int(stage.get("done_bytes") or 0), int(stage["total_bytes"])
        label = show(str(stage.get("label") or status["state"]))
        click.echo(f"progress:  {label}: {format_size(done)} of {format_size(total)} ({done / total:.0%})")
    engine = status.get("engine")
    if engine and engine.get("pid") is None:
        click.echo(f"engine:    not running ({_plural(int(engine.get('restarts') or 0), 'restart')})")
    elif engine:
        click.echo(
            f"engine:    pid {engine.get('pid')}, {_plural(int(engine.get('restarts') or 0), 'restart')}, "
            f"up {_seconds(engine.get('uptime_s'))}, {engine.get('in_flight', 0)} in flight"
        )
        _say_load(engine)
    else:
        click.echo("engine:    none")
    queue = status.get("queue") or {}
    click.echo(
        f"queue:     {queue.get('waiting', 0)} waiting, {queue.get('served', 0)} served, "
        f"{queue.get('timed_out', 0)} timed out, {queue.get('rejected', 0)} rejected"
    )
    res = status.get("residency")
    if res:
        total, resident = int(res.get("total_bytes") or 0), int(res.get("resident_bytes") or 0)
        share = f" ({resident / total:.0%})" if total else ""
        click.echo(f"resident:  {format_size(resident)} of {format_size(total)}{share}")
    check = status.get("verification")
    if check:
        outcome = "OK" if check.get("ok") else _plural(int(check.get("problems") or 0), "problem")
        click.echo(
            f"verified:  {outcome}, {_plural(int(check.get('files') or 0), 'file')}, "
            f"{format_size(int(check.get('bytes') or 0))} in {float(check.get('seconds') or 0):.2f} s"
        )
    failure = status.get("failure")
    if failure:
        click.echo(f"failure:   {show(str(failure.get('reason')))}")
        for line in (failure.get("last_lines") or [])[-5:]:
            click.echo(f"  | {show(str(line)[:300])}")


def _seconds(value: Any) -> str:
    return "?" if value is None else f"{float(value):.1f} s"


class _Finite(click.FloatRange):
    """A float within range that is a number: `nan` passes every range check, `inf` a one-sided one."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{number} is not a finite number", param, ctx)
        return number


def _sampling_options(command: Callable[..., Any]) -> Callable[..., Any]:
    options = (
        _socket_option,
        click.option("--temperature", type=_Finite(min=0.0), default=None, help="Sampling temperature, 0 for greedy."),
        click.option("--top-p", type=_Finite(0.0, 1.0, min_open=True), default=None, help="Nucleus sampling: 0 < P <= 1."),
        click.option("--max-tokens", type=click.IntRange(min=1), default=None, help="Most tokens in an answer."),
        click.option(
            "--seed",
            type=click.IntRange(0, 2**63 - 1),
            default=None,
            help="Sampling seed: the same seed, prompt and options give the same answer.",
        ),
        click.option("--system", default=None, metavar="TEXT", help="A system message to start the conversation with."),
    )
    for option in reversed(options):
        command = option(command)
    return command


class _WaitDisplay:
    """What a starting daemon is doing, on stderr: a line per change (one line rewritten on a terminal)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.terminal = sys.stderr.isatty()
        self.last: tuple[Any, ...] | None = None

    def show(self, waiting: Any) -> None:
        share = waiting.done_bytes / waiting.total_bytes if waiting.total_bytes else None
        key = (waiting.state, waiting.phases, waiting.label, None if share is None else int(share * 10))  # a line a tenth
        if self.quiet or (key == self.last and not self.terminal):
            return
        words = _STATE_WORDS.get(waiting.state)
        line = f"waiting for the daemon ({waiting.waited_s:.0f} s): state {show(waiting.state)}" + (f", {words}" if words else "")
        if share is not None:
            line += f" ({show(waiting.label)}: {share:.0%} of {format_size(waiting.total_bytes)})"
        if waiting.phases:
            line += "; done: " + ", ".join(f"{show(name)} {seconds:.2f} s" for name, seconds in waiting.phases)
        if self.terminal:  # one line rewritten in place: cut to the width, or a wrapped line would stay behind
            click.echo(f"\r\033[K{line[: shutil.get_terminal_size().columns - 1]}", nl=False, err=True)
        else:
            click.echo(line, err=True)
        self.last = key

    def ready(self, waited_s: float) -> None:
        if self.last is not None and not self.quiet:
            click.echo(f"{chr(13)}\033[K" if self.terminal else "", nl=False, err=True)
            click.echo(f"the daemon is ready (waited {waited_s:.1f} s)", err=True)


def _wait_for_model(obj: Context, socket: Path) -> str:
    from prewarm.ask import served_name, wait_until_ready

    display = _WaitDisplay(obj.quiet)
    started = time.monotonic()
    status = wait_until_ready(socket, display.show)
    display.ready(time.monotonic() - started)
    return served_name(socket, status)


def _answer(obj: Context, socket: Path, messages: list[dict[str, str]], options: Any, echo: bool, chat: bool) -> tuple[str, Any]:
    """Stream one answer (to stdout when ``echo``): its text, and its Timing (None when Ctrl-C
    stopped it, which in a chat returns to the prompt)."""
    from prewarm.ask import Timing, stream_chat

    model = _wait_for_model(obj, socket)
    pieces: list[str] = []
    timing: Timing | None = None
    terminal = sys.stdout.isatty()
    stopped = False
    try:
        with contextlib.closing(stream_chat(socket, messages, options, model)) as stream:
            for item in stream:
                if isinstance(item, Timing):
                    timing = item
                else:
                    pieces.append(item)
                    if echo:
                        click.echo(_for_terminal(item) if terminal else item, nl=False)
    except KeyboardInterrupt:
        if not chat:
            raise
        stopped = True
    finally:
        if echo and (pieces or chat):
            click.echo()  # the answer's line ends, even when it was stopped; in a chat, every answer is a line
    if stopped:
        click.echo("[answer stopped]", err=True)
    if timing is not None and not obj.quiet:
        click.echo(_timing_line(timing), err=True)
    return "".join(pieces), timing


def _for_terminal(text: str) -> str:
    """An answer's control characters (an escape sequence, a carriage return) shown escaped, so a
    model cannot rewrite the terminal; newlines and tabs stay. Piped output is left exact."""
    if all(c.isprintable() or c in "\n\t" for c in text):
        return text
    return "".join(c if c.isprintable() or c in "\n\t" else c.encode("unicode_escape").decode("ascii") for c in text)


def _timing_line(t: Any) -> str:
    first = "no text" if t.first_token_s is None else f"first token after {t.first_token_s:.3f} s"
    tokens = "?" if t.completion_tokens is None else str(t.completion_tokens)
    line = f"{first}, {tokens} tokens in {t.total_s:.2f} s"
    if t.tokens_per_s is not None:
        line += f" ({t.tokens_per_s:.1f} tokens/s after the first)"
    if t.prompt_tokens is not None:
        line += f", prompt {t.prompt_tokens} tokens"
    if t.finish_reason == "length":
        line += "; cut off at --max-tokens"
    return line


def _conversation(system: str | None) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}] if system else []


@main.command()
@click.argument("prompt")
@_sampling_options
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    callback=_remember_json,
    is_eager=True,
    help='Ask for a JSON object as the answer (response_format {"type": "json_object"}) and print it on stdout.',
)
@click.pass_obj
def ask(
    obj: Context,
    prompt: str,
    socket_path: Path | None,
    temperature: float | None,
    top_p: float | None,
    max_tokens: int | None,
    seed: int | None,
    system: str | None,
    as_json: bool,
) -> None:
    """Ask the daemon PROMPT and print the answer on stdout as it streams.

    Then, on stderr: the time to the first token and the tokens per second. While the daemon is
    still starting, shows what it is waiting for and asks once an engine serves.
    """
    from prewarm.ask import Options, check_json_answer

    if prompt.strip() == "":
        raise UsageError("an empty PROMPT was given (is a shell variable unset?)", hint='prewarm ask "What is a page cache?"')
    socket = socket_path or default_socket()
    messages = [*_conversation(system), {"role": "user", "content": prompt}]
    options = Options(temperature, top_p, max_tokens, seed, json_object=as_json)
    text, timing = _answer(obj, socket, messages, options, echo=not as_json, chat=False)
    if as_json:  # printed whole, once it is known to be complete JSON: a script reads stdout as one document
        check_json_answer(socket, text, timing)
        click.echo(text)


@main.command()
@_sampling_options
@click.pass_obj
def chat(
    obj: Context,
    socket_path: Path | None,
    temperature: float | None,
    top_p: float | None,
    max_tokens: int | None,
    seed: int | None,
    system: str | None,
) -> None:
    """Talk with the model: each line read is sent with the conversation so far, the answer streamed.

    End of input (Ctrl-D) or /exit ends it; Ctrl-C during an answer stops that answer. Lines may
    be piped in (`printf 'Hi\\nAnd then?\\n' | prewarm chat`).
    """
    from prewarm.ask import Options

    socket = socket_path or default_socket()
    options = Options(temperature, top_p, max_tokens, seed)
    messages = _conversation(system)
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (input() then edits lines and keeps their history)

        model = _wait_for_model(obj, socket)
        click.echo(f"chatting with {show(model)} on {show(str(socket))}; /exit or Ctrl-D ends", err=True)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            return
        except KeyboardInterrupt:
            if not interactive:
                raise
            click.echo("\n(/exit or Ctrl-D ends the chat)", err=True)
            continue
        if line.strip() == "/exit":
            return
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        text, _ = _answer(obj, socket, messages, options, echo=True, chat=True)
        messages.append({"role": "assistant", "content": text})  # a stopped answer as far as it came
