"""The ``prewarm`` command: thin click commands over the stages; the only module that prints."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from prewarm import __version__
from prewarm.errors import ExitCode, FilesystemError, PrewarmError
from prewarm.units import format_size, parse_size

log = logging.getLogger("prewarm")


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so ``finally`` blocks clean up as for Ctrl-C."""


class PlainProgress:
    """One line on stderr every 10% of work that lasts over a second: readable in journald and CI logs."""

    def __init__(self, quiet_seconds: float = 1.0) -> None:
        self.quiet_seconds = quiet_seconds
        self.lock = threading.Lock()
        self.label, self.total, self.done, self.next_mark, self.started = "", 0, 0, 0.1, 0.0

    def start(self, label: str, total: int) -> None:
        self.label, self.total, self.done, self.next_mark = label, total, 0, 0.1
        self.started = time.perf_counter()

    def advance(self, n: int) -> None:
        with self.lock:
            self.done += n
            elapsed = time.perf_counter() - self.started
            if self.total and self.done / self.total >= self.next_mark and elapsed >= self.quiet_seconds:
                pct = int(self.done * 100 / self.total)
                self.next_mark = (pct // 10 + 1) / 10
                rate = self.done / elapsed
                click.echo(
                    f"{self.label}: {pct}% ({format_size(self.done)} of {format_size(self.total)}, {format_size(rate)}/s)",
                    err=True,
                )

    def finish(self) -> None:
        pass


class BarProgress:
    """A tqdm bar on a terminal (tqdm comes with huggingface_hub)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bar: Any = None

    def start(self, label: str, total: int) -> None:
        from tqdm import tqdm

        self.finish()
        self.bar = tqdm(
            total=total,
            desc=label,
            unit="B",
            unit_scale=True,
            unit_divisor=1000,
            file=sys.stderr,
            dynamic_ncols=True,
            leave=False,
        )

    def advance(self, n: int) -> None:
        with self.lock:
            if self.bar is not None:
                self.bar.update(n)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class NoOutput:
    def start(self, label: str, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def finish(self) -> None:
        pass


@dataclasses.dataclass
class Context:
    quiet: bool
    debug: bool

    def progress(self, as_json: bool = False) -> BarProgress | PlainProgress | NoOutput:
        if self.quiet:
            return NoOutput()
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
        debug = os.environ.get("PREWARM_DEBUG") == "1" or "--debug" in sys.argv[1:]
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
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )


def _emit(as_json: bool, data: dict[str, Any], human: Callable[[], None]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        human()


def _size_option(value: str) -> int:
    return parse_size(value)


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
@_json_flag
@click.pass_obj
def reshard(obj: Context, source: Path, destination: Path, max_size: str, as_json: bool) -> None:
    """Rewrite the checkpoint SOURCE as shards of at most SIZE in the new directory DESTINATION.

    SOURCE is a model directory (shards with or without model.safetensors.index.json, or one
    model.safetensors) or a single .safetensors file. DESTINATION gets the shards, the index,
    the model's other files and prewarm.manifest.json, all at once or not at all.
    """
    from prewarm.reshard import reshard as run

    result = run(source, destination, parse_size(max_size), obj.progress(as_json))
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
            click.echo(f"  not copied (other weight formats or unindexed shards): {', '.join(result.skipped_files)}")

    _emit(as_json, data, human)


@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
@_threads
@_json_flag
@click.pass_obj
def verify(obj: Context, directory: Path, threads: int | None, as_json: bool) -> None:
    """Check every byte of DIRECTORY against its prewarm.manifest.json.

    Exits 0 when everything matches, 1 naming each missing, extra, resized or corrupted file
    (with the byte range of each bad chunk).
    """
    from prewarm.verify import verify_directory

    report = verify_directory(directory, threads, obj.progress(as_json))
    problems = [{k: v for k, v in dataclasses.asdict(p).items() if v not in (None, "")} for p in report.problems]
    data = {
        "ok": report.ok,
        "problems": problems,
        "files": report.files,
        "bytes_checked": report.bytes_checked,
        "seconds": round(report.seconds, 3),
    }

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

    _emit(as_json, data, human)
    if not report.ok:
        sys.exit(int(ExitCode.CHECK_FAILED))


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
