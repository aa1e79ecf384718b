"""The ``prewarm`` command: thin click commands over the stages; the only module that prints."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from prewarm import __version__
from prewarm.config import debug_enabled
from prewarm.errors import ExitCode, FilesystemError, PrewarmError
from prewarm.progress import BarProgress, NoProgress, PlainProgress, Progress
from prewarm.units import format_size, parse_size


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so ``finally`` blocks clean up as for Ctrl-C."""


@dataclasses.dataclass
class Context:
    quiet: bool
    debug: bool

    def progress(self, as_json: bool = False) -> Progress:
        if self.quiet:
            return NoProgress()
        if sys.stderr.isatty() and not as_json:
            return BarProgress()
        return PlainProgress()


def _fail(error: PrewarmError) -> NoReturn:
    click.echo(f"Error: {error}", err=True)
    if error.hint:
        click.echo(f"  hint: {error.hint}", err=True)
    sys.exit(int(error.exit_code))


def _sigterm(signum: int, frame: object) -> NoReturn:
    raise _Terminated()


class PrewarmGroup(click.Group):
    """Turns PrewarmError into one line and an exit code; tracebacks only with --debug."""

    def invoke(self, ctx: click.Context) -> Any:
        debug = debug_enabled() or "--debug" in sys.argv[1:]
        try:
            return super().invoke(ctx)
        except PrewarmError as error:
            if debug:
                raise
            _fail(error)
        except OSError as error:  # the filesystem said no somewhere we did not expect
            if debug:
                raise
            _fail(FilesystemError(error.strerror or str(error), error.filename))
        except (KeyboardInterrupt, _Terminated):
            click.echo("Interrupted: nothing was left half-written.", err=True)
            sys.exit(int(ExitCode.INTERRUPTED))


@click.group(cls=PrewarmGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="prewarm")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@click.option("--debug", is_flag=True, help="Show tracebacks (also PREWARM_DEBUG=1).")
@click.pass_context
def main(ctx: click.Context, quiet: bool, debug: bool) -> None:
    """Prepare model weights for instant, hot LLM serving."""
    ctx.obj = Context(quiet=quiet, debug=debug)
    signal.signal(signal.SIGTERM, _sigterm)
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, stream=sys.stderr, format="%(levelname)s: %(message)s")


def _emit(as_json: bool, data: dict[str, Any], human: Callable[[], None]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        human()


_json_flag = click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
_threads = click.option("--threads", type=click.IntRange(1, 256), default=None, help="Reader threads (default: one per CPU).")


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("destination", type=click.Path(path_type=Path))
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
def reshard(obj: Context, source: Path, destination: Path, max_size: str, revision: str, as_json: bool) -> None:
    """Rewrite the checkpoint SOURCE as shards of at most SIZE in the new directory DESTINATION.

    SOURCE is a model directory (shards with or without model.safetensors.index.json, or one
    model.safetensors), a single .safetensors file, or a hub repo id (owner/name), fetched first.
    DESTINATION gets the shards, the index, the model's other files and prewarm.manifest.json,
    all at once or not at all.
    """
    from prewarm.fetch import REPO_ID, fetch
    from prewarm.reshard import reshard as run

    limit = parse_size(max_size)
    source_info = None
    if not source.exists() and REPO_ID.fullmatch(str(source)):
        fetched = fetch(str(source), revision, progress=obj.progress(as_json))
        _say_fetched(fetched)
        source, source_info = fetched.directory, fetched.source_info()
    result = run(source, destination, limit, obj.progress(as_json), source_info)
    data = dataclasses.asdict(result) | {"destination": str(result.destination)}
    data["shards"] = [{"file": n, "bytes": b, "tensors": t} for n, b, t in result.shards]

    def human() -> None:
        t = result.timings
        click.echo(
            f"Wrote {result.destination}: {len(result.shards)} shards, {format_size(result.bytes_written)}"
            f" in {t['total']:.1f} s (plan {t['plan']:.2f} s, copy {t['copy']:.1f} s, "
            f"sync {t['sync']:.1f} s)"
        )
        for name, size, tensors in result.shards:
            click.echo(f"  {name}  {format_size(size):>10}  {tensors} tensors")
        if result.copied_files:
            click.echo(f"  copied: {', '.join(result.copied_files)}")
        if result.skipped_files:
            skipped = ", ".join(result.skipped_files)
            click.echo(f"  not copied (other weight formats, unindexed shards, subdirectories): {skipped}")

    _emit(as_json, data, human)


@main.command()
@click.argument("repo_id")
@click.option("--revision", default="main", show_default=True, help="Branch, tag or commit to fetch.")
@click.option(
    "--dest",
    type=click.Path(path_type=Path),
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


@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
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
    record_verification(report)
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
            detail = f" ({p.detail})" if p.detail else ""
            click.echo(f"{p.kind:<10} {p.file}{where}{detail}")
        rate = report.bytes_checked / max(report.seconds, 1e-9)
        state = "OK" if report.ok else f"FAILED: {len(report.problems)} problems"
        click.echo(
            f"{state}: {report.files} files, {format_size(report.bytes_checked)} checked in "
            f"{report.seconds:.2f} s ({format_size(rate)}/s)"
        )
        if warmed is not None:
            click.echo(f"Resident: {_percent(warmed.after)} ({format_size(warmed.bytes_read)} more read)")

    _emit(as_json, data, human)
    if not report.ok or (warmed is not None and not warmed.after.complete):
        sys.exit(int(ExitCode.CHECK_FAILED))


def _warm_after_verify(obj: Context, directory: Path, threads: int | None, as_json: bool, data: dict[str, Any]) -> Any:
    from prewarm.warm import warm as run_warm

    result = run_warm(directory, threads, obj.progress(as_json))
    data["warm"] = _warm_json(result)
    return result


def _percent(residency: Any) -> str:
    share = residency.resident_bytes / residency.total_bytes if residency.total_bytes else 1.0
    return f"{format_size(residency.resident_bytes)} of {format_size(residency.total_bytes)} ({share:.0%})"


def _residency_json(residency: Any) -> dict[str, Any]:
    return {
        "total_bytes": residency.total_bytes,
        "resident_bytes": residency.resident_bytes,
        "files": [{"name": f.name, "bytes": f.bytes, "resident_bytes": f.resident_bytes} for f in residency.files],
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
@click.argument("directory", type=click.Path(path_type=Path))
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

    result = run_warm(directory, threads, obj.progress(as_json), parse_size(budget) if budget else None)
    data = _warm_json(result)

    def human() -> None:
        rate = result.bytes_read / max(result.seconds, 1e-9)
        click.echo(
            f"Warmed {directory}: read {format_size(result.bytes_read)} in {result.seconds:.2f} s "
            f"({format_size(rate)}/s); {format_size(result.before.resident_bytes)} was already resident; "
            f"now {_percent(result.after)} resident"
        )

    if not lock or not result.after.complete:
        _emit(as_json, data, human)
        if not result.after.complete:
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


@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
@_json_flag
def status(directory: Path, as_json: bool) -> None:
    """Show how much of DIRECTORY is in the page cache (mincore), and when it was last verified."""
    from prewarm.verify import last_verification
    from prewarm.warm import residency

    res = residency(directory)
    record = last_verification(directory)
    has_manifest = (directory / "prewarm.manifest.json").is_file()
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

    def human() -> None:
        width = max((len(f.name) for f in res.files), default=4)
        for f in res.files:
            share = f.resident_bytes / f.bytes if f.bytes else 1.0
            click.echo(f"{f.name:<{width}}  {format_size(f.bytes):>10}  {share:>5.0%} resident")
        click.echo(f"{'total':<{width}}  {format_size(res.total_bytes):>10}  {_percent(res)}")
        click.echo(f"manifest: {_verification_line(has_manifest, verified)}")

    _emit(as_json, data, human)


def _verification_line(has_manifest: bool, verified: dict[str, Any] | None) -> str:
    if not has_manifest:
        return "none (run `prewarm manifest DIR`)"
    if verified is None:
        return "never verified"
    outcome = "OK" if verified["ok"] else f"{verified['problems']} problems"
    changed = "; the manifest has changed since" if verified["manifest_changed"] else ""
    return f"last verified {verified['verified_at']}: {outcome}{changed}"


@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
@_json_flag
def evict(directory: Path, as_json: bool) -> None:
    """Drop DIRECTORY's files from the page cache (no root needed), e.g. to measure a cold start."""
    from prewarm.warm import evict as run_evict

    before, after = run_evict(directory)
    data = {"before": _residency_json(before), "after": _residency_json(after)}

    def human() -> None:
        click.echo(f"Evicted {directory}: {format_size(before.resident_bytes)} -> {format_size(after.resident_bytes)} resident")
        if after.resident_bytes:
            click.echo("  what stayed is mapped or locked by another process (a running engine, `warm --lock`)")

    _emit(as_json, data, human)


@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
@_threads
@_json_flag
@click.pass_obj
def manifest(obj: Context, directory: Path, threads: int | None, as_json: bool) -> None:
    """Write DIRECTORY/prewarm.manifest.json for a directory prewarm did not produce.

    Hashes every file (hidden ones excepted) so that `prewarm verify` can check it later.
    """
    from prewarm.manifest import build_manifest, write_manifest

    started = time.perf_counter()
    result = build_manifest(directory, threads, obj.progress(as_json))
    path = write_manifest(directory, result)
    seconds = time.perf_counter() - started
    data = {"manifest": str(path), "files": len(result.files), "bytes": result.total_bytes, "seconds": round(seconds, 3)}
    _emit(
        as_json,
        data,
        lambda: click.echo(
            f"Wrote {path}: {len(result.files)} files, {format_size(result.total_bytes)} hashed in {seconds:.2f} s"
        ),
    )
