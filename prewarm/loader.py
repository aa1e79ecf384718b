"""Read a serving directory's weights into tensors fast, checking every byte against the manifest.

Reader threads each take a manifest chunk (16 MiB) and read it piece by piece into a small ring
of their own buffers (pinned on a GPU). Each piece is hashed while it is still in the CPU's cache
and then copied out of that same buffer into the tensors it belongs to (asynchronously on a GPU,
while the thread reads its next piece), so checking costs no second read and what is copied is
exactly what was hashed. The main thread hands chunks out in order and takes them back in order;
a tensor is yielded only once every chunk holding its bytes has matched the manifest, so a bad
byte stops the load before the model sees any tensor it touched. Host memory: ``threads x
buffers x piece_bytes`` (pinned buffers are slow to make: few and small), plus the tensors being
assembled, whatever the model's size. Needs torch (the engine's process); the daemon never
imports this module.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import xxhash

from prewarm.checkpoint import identity_of
from prewarm.confine import NotRegular, Root, open_regular, root_of
from prewarm.errors import ExitCode, PrewarmError
from prewarm.manifest import Manifest, read_manifest
from prewarm.safetensors import SafetensorsFile, TensorInfo, read_safetensors_header
from prewarm.verify import RECORD_NAME, last_verification

log = logging.getLogger(__name__)

CHECKS = ("hash", "record")  # record: trust a verification whose files are provably unchanged
PIECE_BYTES = 8 << 20  # read, hashed while in the CPU's cache, then copied out (measured: BENCHMARKS.md)
READ_AHEAD = 2  # chunks in flight per reader thread: the tensors they fill are allocated ahead
_DTYPES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "I64": "int64",
    "U64": "uint64",
    "F64": "float64",
    "C64": "complex64",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
}
_HINT = "run `prewarm verify DIR` to see every damaged range, then restore the files or reshard again"
_OPTIONS_HINT = "the settings are described in the README's section on the prewarm load format"


@dataclass
class LoadRefused(PrewarmError):
    """The directory cannot be loaded as it is: no manifest, or files that are not the manifest's."""


@dataclass
class LoadCheckFailed(PrewarmError):
    """Bytes that do not match the manifest: nothing of them reached the model."""

    offset: int = 0
    length: int = 0


@dataclass(frozen=True)
class LoadOptions:
    check: str = "hash"
    threads: int = 0  # 0: one per core, at most 8 (H200 host: 12 is faster when the CPUs are idle, far slower when not)
    buffers: int = 0  # per reader thread; 0: 2, one read and hashed while another's copy runs
    piece_bytes: int = PIECE_BYTES

    def __post_init__(self) -> None:
        if self.check not in CHECKS:
            raise LoadRefused(
                f"check must be one of {', '.join(CHECKS)}, not {self.check!r}", hint=_OPTIONS_HINT, exit_code=ExitCode.USAGE
            )
        for name in ("threads", "buffers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 256:
                raise LoadRefused(
                    f"{name} must be a whole number from 0 (automatic) to 256, not {value!r}",
                    hint=_OPTIONS_HINT,
                    exit_code=ExitCode.USAGE,
                )
        if not isinstance(self.piece_bytes, int) or not 4096 <= self.piece_bytes <= 1 << 30:
            raise LoadRefused(
                f"piece_bytes must be from 4096 to 1 GiB, not {self.piece_bytes!r}", hint=_OPTIONS_HINT, exit_code=ExitCode.USAGE
            )

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> LoadOptions:
        """From vLLM's ``--model-loader-extra-config`` JSON object."""
        unknown = sorted(set(config) - {"check", "threads", "buffers", "piece_bytes"})
        if unknown:
            raise LoadRefused(
                f"unknown loader setting {unknown[0]!r}",
                hint="--model-loader-extra-config takes check, threads, buffers and piece_bytes",
                exit_code=ExitCode.USAGE,
            )
        return cls(**config)  # type: ignore[arg-type]  # each field is checked in __post_init__

    def resolved_threads(self) -> int:
        return self.threads or max(1, min(8, len(os.sched_getaffinity(0))))

    def resolved_buffers(self) -> int:
        return self.buffers or 2

    def host_bytes(self) -> int:
        """The most host memory the reader's buffers take."""
        return self.resolved_threads() * self.resolved_buffers() * self.piece_bytes


@dataclass
class LoadReport:
    directory: str
    device: str
    files: int = 0
    tensors: int = 0
    bytes: int = 0
    seconds: float = 0.0
    hashed: bool = True
    check: str = "hash"
    threads: int = 0
    buffers: int = 0  # per reader thread
    buffer_bytes: int = 0
    buffers_made: int = 0  # in all: at most threads x buffers
    read_wait_s: float = 0.0  # the consumer waiting for readers: above zero, reading is the bottleneck

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, object]:
        return asdict(self) | {"gb_per_s": round(self.gb_per_s, 3), "seconds": round(self.seconds, 4)}


@dataclass
class _Shard:
    name: str
    fd: int
    header: SafetensorsFile
    head: bytes  # the header's bytes as parsed: the hashed bytes must be these
    identity: tuple[int, ...]
    allocated: int = 0  # the first tensor whose last chunk has not yet been handed to a reader
    completed: int = 0  # the first tensor not yet yielded
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class _Chunk:
    shard: int
    index: int
    offset: int
    length: int
    expected: str | None  # None: not hashed (a trusted verification record)


class CheckedReader:
    """The tensors of every ``*.safetensors`` file the manifest lists, in file then offset order."""

    def __init__(self, directory: Path, device: str | torch.device = "cpu", options: LoadOptions | None = None) -> None:
        self.directory = Path(directory)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # the reader threads' own default is device 0
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.options = options or LoadOptions()
        self._manifest = _manifest_of(self.directory)
        self._shards = _open_shards(root_of(self.directory), self.directory, self._manifest)
        self._hashed = not (self.options.check == "record" and _record_trusted(self.directory, self._shards))
        self._chunks = list(self._plan())
        self._stream: torch.cuda.Stream | None = None  # the consumer's CUDA stream: copies go on it
        self._local = threading.local()
        self._rings: list[_Ring] = []
        self.report = LoadReport(
            str(self.directory),
            str(self.device),
            files=len(self._shards),
            bytes=sum(c.length for c in self._chunks),
            hashed=self._hashed,
            check=self.options.check,
            threads=self.options.resolved_threads(),
            buffers=self.options.resolved_buffers(),
            buffer_bytes=self.options.piece_bytes,
        )

    def close(self) -> None:
        for shard in self._shards:
            if shard.fd >= 0:
                os.close(shard.fd)
                shard.fd = -1

    def __enter__(self) -> CheckedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _plan(self) -> Iterator[_Chunk]:
        size = self._manifest.chunk_size
        for i, shard in enumerate(self._shards):
            digest = self._manifest.files[shard.name]
            for index, expected in enumerate(digest.chunks):
                offset = index * size
                yield _Chunk(i, index, offset, min(size, digest.size - offset), expected if self._hashed else None)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) on ``device``; raises LoadCheckFailed before yielding a bad byte.

        The main thread allocates a chunk's tensors as it hands the chunk to a reader; the reader
        reads, hashes and copies (on a GPU asynchronously, on the consumer's stream, which orders
        the copies before the model's use); the main thread takes chunks back in order and yields
        the tensors they complete."""
        started = time.perf_counter()
        self._stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        pending = iter(self._chunks)
        inflight: deque[tuple[_Chunk, Future[None]]] = deque()
        pool = ThreadPoolExecutor(self.report.threads, thread_name_prefix="prewarm-load")

        def submit_next() -> None:
            chunk = next(pending, None)
            if chunk is not None:
                inflight.append((chunk, pool.submit(self._read, chunk, self._allocate(chunk))))

        try:
            for _ in range(self.report.threads * READ_AHEAD):
                submit_next()
            while inflight:
                chunk, future = inflight.popleft()
                waited = time.perf_counter()
                future.result()
                self.report.read_wait_s += time.perf_counter() - waited
                submit_next()
                for name, tensor in self._completed(chunk):
                    self.report.tensors += 1
                    yield name, tensor
                if chunk.index == len(self._manifest.files[self._shards[chunk.shard].name].chunks) - 1:
                    self._finish_shard(self._shards[chunk.shard])
            if self._stream is not None:
                self._stream.synchronize()
            self.report.seconds = time.perf_counter() - started
        finally:
            for _, future in inflight:
                future.cancel()
            pool.shutdown(wait=True)
            self.report.buffers_made = sum(len(ring.buffers) for ring in self._rings)
            self._rings.clear()  # the pinned buffers go back now, not when the reader is collected
            self.close()

    def _allocate(self, chunk: _Chunk) -> list[tuple[torch.Tensor, int, int]]:
        """The tensors (new ones allocated now) that the chunk's bytes go to: (target, from, to)
        with from/to relative to the chunk."""
        shard = self._shards[chunk.shard]
        start, end = chunk.offset, chunk.offset + chunk.length
        tensors, copies = shard.header.tensors, []
        while shard.allocated < len(tensors) and tensors[shard.allocated].begin < end:
            info = tensors[shard.allocated]
            lo, hi = max(info.begin, start), min(info.end, end)
            if hi > lo:
                part = shard.parts.get(info.name)
                if part is None:
                    part = shard.parts[info.name] = torch.empty(info.nbytes, dtype=torch.uint8, device=self.device)
                copies.append((part[lo - info.begin : hi - info.begin], lo - start, hi - start))
            if info.end > end:
                break
            shard.allocated += 1
        return copies

    def _read(self, chunk: _Chunk, copies: list[tuple[torch.Tensor, int, int]]) -> None:
        """In a reader thread: the chunk read, hashed and put into its tensors; raises on a mismatch."""
        hasher = xxhash.xxh3_128() if chunk.expected is not None else None
        if self.device.type == "cpu":
            self._read_into_tensors(chunk, copies, hasher)
        else:
            self._read_through_buffers(chunk, copies, hasher)
        if hasher is not None and hasher.hexdigest() != chunk.expected:
            end = chunk.offset + chunk.length
            raise LoadCheckFailed(
                f"bytes {chunk.offset}-{end - 1} (chunk {chunk.index}) do not match the manifest; "
                "no tensor with bytes there was loaded",
                str(self.directory / self._shards[chunk.shard].name),
                hint=_HINT,
                offset=chunk.offset,
                length=chunk.length,
            )

    def _read_through_buffers(self, chunk: _Chunk, copies: list[tuple[torch.Tensor, int, int]], hasher: Any) -> None:
        """Piece by piece into this thread's pinned buffers, hashed, then copied to the device."""
        ring, shard = self._ring(), self._shards[chunk.shard]
        done = 0
        while done < chunk.length:
            buffer = ring.next()
            piece = buffer.view[: min(buffer.size, chunk.length - done)]
            self._read_exactly(shard, piece, chunk.offset + done)
            if hasher is not None:
                hasher.update(piece)
            self._check_head(shard, chunk.offset + done, piece)
            for target, lo, hi in copies:
                a, b = max(lo, done), min(hi, done + len(piece))
                if b > a:
                    target[a - lo : b - lo].copy_(buffer.tensor[a - done : b - done], non_blocking=True)
            buffer.copied(self._stream)
            done += len(piece)

    def _read_into_tensors(self, chunk: _Chunk, copies: list[tuple[torch.Tensor, int, int]], hasher: Any) -> None:
        """On the CPU, straight into the tensors' own memory and hashed there: no buffer, no copy.
        The tensors are yielded only after the whole chunk matched, and nothing else writes them."""
        shard = self._shards[chunk.shard]
        done = max(0, min(chunk.length, len(shard.head) - chunk.offset))  # header bytes in this chunk
        if done:
            header = memoryview(bytearray(done))
            self._read_exactly(shard, header, chunk.offset)
            if hasher is not None:
                hasher.update(header)
            self._check_head(shard, chunk.offset, header)
        for target, lo, hi in copies:  # the tensors' bytes follow the header without a gap
            if lo != done:
                raise AssertionError(f"chunk {chunk.index} of {shard.name}: a gap at {lo}, expected {done}")
            view = host_view(target)
            for at in range(0, hi - lo, self.options.piece_bytes):
                piece = view[at : at + self.options.piece_bytes]
                self._read_exactly(shard, piece, chunk.offset + lo + at)
                if hasher is not None:
                    hasher.update(piece)
            done = hi
        if done != chunk.length:
            raise AssertionError(f"chunk {chunk.index} of {shard.name}: {done} of {chunk.length} bytes placed")

    def _ring(self) -> _Ring:
        ring: _Ring | None = getattr(self._local, "ring", None)
        if ring is None:
            if self._stream is not None:  # this thread's copies go on the consumer's stream, in order before its use
                torch.cuda.set_stream(self._stream)
            ring = self._local.ring = _Ring(self.options.resolved_buffers(), self.options.piece_bytes, self.device)
            self._rings.append(ring)
        return ring

    def _read_exactly(self, shard: _Shard, into: memoryview, offset: int) -> None:
        done = 0
        while done < len(into):
            got = os.preadv(shard.fd, [into[done:]], offset + done)
            if got == 0:
                raise LoadRefused("the file shrank while being loaded", str(self.directory / shard.name), hint=_HINT)
            done += got

    def _check_head(self, shard: _Shard, offset: int, piece: memoryview) -> None:
        """The header's bytes as read now must be the ones parsed when the file was opened."""
        head = shard.head[offset : offset + len(piece)]
        if head and bytes(piece[: len(head)]) != head:
            raise LoadRefused("the header changed while being loaded", str(self.directory / shard.name), hint=_HINT)

    def _completed(self, chunk: _Chunk) -> list[tuple[str, torch.Tensor]]:
        """The tensors whose last bytes were in ``chunk`` (read and copied, in order)."""
        shard = self._shards[chunk.shard]
        end = chunk.offset + chunk.length
        ready, tensors = [], shard.header.tensors
        while shard.completed < len(tensors) and tensors[shard.completed].end <= end:
            info = tensors[shard.completed]
            raw = shard.parts.pop(info.name, None)
            if raw is None:  # no bytes: a tensor with a zero in its shape
                raw = torch.empty(0, dtype=torch.uint8, device=self.device)
            ready.append((info.name, _typed(raw, info)))
            shard.completed += 1
        return ready

    def _finish_shard(self, shard: _Shard) -> None:
        """Trusting a record means trusting the file stayed the same to the end of the read."""
        if not self._hashed and identity_of(os.fstat(shard.fd)) != shard.identity:
            raise LoadRefused(
                "the file changed while being loaded unchecked",
                str(self.directory / shard.name),
                hint="load again with check = 'hash'",
            )
        os.close(shard.fd)
        shard.fd = -1


class _Buffer:
    def __init__(self, size: int, device: torch.device) -> None:
        self.size = size
        self.tensor = torch.empty(size, dtype=torch.uint8, pin_memory=device.type == "cuda")
        self.view = host_view(self.tensor)
        self.event = torch.cuda.Event() if device.type == "cuda" else None  # type: ignore[no-untyped-call]
        self.pending = False

    def copied(self, stream: torch.cuda.Stream | None) -> None:
        """Mark the copies issued from this buffer: it is refilled only once they are done."""
        if stream is not None and self.event is not None:
            self.event.record(stream)
            self.pending = True

    def wait_copied(self) -> None:
        if self.pending and self.event is not None:
            self.event.synchronize()
            self.pending = False


class _Ring:
    """One reader thread's buffers, made as first needed, then reused in turn."""

    def __init__(self, count: int, size: int, device: torch.device) -> None:
        self.count, self.size, self.device = count, size, device
        self.buffers: list[_Buffer] = []
        self.turn = 0

    def next(self) -> _Buffer:
        if len(self.buffers) < self.count:
            self.buffers.append(_Buffer(self.size, self.device))
            return self.buffers[-1]
        buffer = self.buffers[self.turn % self.count]
        self.turn += 1
        buffer.wait_copied()
        return buffer


def host_view(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous uint8 tensor in host memory, for preadv and xxhash."""
    return memoryview((ctypes.c_char * tensor.numel()).from_address(tensor.data_ptr())).cast("B")


def _typed(raw: torch.Tensor, info: TensorInfo) -> torch.Tensor:
    name = _DTYPES.get(info.dtype)
    dtype = getattr(torch, name, None) if name else None
    if dtype is None:
        raise LoadRefused(
            f"tensor {info.name!r} has dtype {info.dtype}, which this torch cannot hold",
            hint='use a newer torch in vLLM\'s environment, or load_format = "auto"',
        )
    return raw.view(dtype).reshape(info.shape)


def _manifest_of(directory: Path) -> Manifest:
    try:
        return read_manifest(directory)
    except PrewarmError as exc:
        raise LoadRefused(
            f"the prewarm load format checks every byte against the manifest: {exc.message}",
            exc.path or str(directory),
            hint=exc.hint or f"run `prewarm manifest {directory}` on files you trust",
        ) from None


def _open_shards(root: Root, directory: Path, manifest: Manifest) -> list[_Shard]:
    names = sorted(name for name in manifest.files if name.endswith(".safetensors"))
    if not names:
        raise LoadRefused("the manifest lists no .safetensors files", str(directory), hint="point --model at a serving directory")
    shards: list[_Shard] = []
    seen: dict[str, str] = {}
    try:
        for name in names:
            shards.append(_open_shard(root, directory, name, manifest))
            for info in shards[-1].header.tensors:
                if info.name in seen:
                    raise LoadRefused(
                        f"tensor {info.name!r} is in both {seen[info.name]} and {name}",
                        str(directory),
                        hint="reshard the checkpoint: a serving directory holds each tensor once",
                    )
                seen[info.name] = name
    except BaseException:
        for shard in shards:
            os.close(shard.fd)
        raise
    return shards


def _open_shard(root: Root, directory: Path, name: str, manifest: Manifest) -> _Shard:
    path = directory / name
    try:
        fd = open_regular(root, name)
    except FileNotFoundError:
        raise LoadRefused("a file the manifest lists is missing", str(path), hint=_HINT) from None
    except NotRegular as why:
        raise LoadRefused(f"refused: {why.reason}", str(path), hint=_HINT) from None
    except OSError as exc:
        raise LoadRefused(
            f"cannot open: {exc.strerror}", str(path), hint="check the file's permissions for the engine's user"
        ) from None
    try:
        st = os.fstat(fd)
        if st.st_size != manifest.files[name].size:
            raise LoadRefused(f"{st.st_size} bytes, the manifest says {manifest.files[name].size}", str(path), hint=_HINT)
        header = read_safetensors_header(path, fd)
        head = os.pread(fd, header.data_start, 0)
    except BaseException:
        os.close(fd)
        raise
    return _Shard(name, fd, header, head, identity_of(st))


def _record_trusted(directory: Path, shards: list[_Shard]) -> bool:
    """A passed verification of these very files: same manifest bytes, and every file's size,
    mtime, ctime and inode as when it was hashed (ctime cannot be set back, mtime can)."""
    writable = _writable_by_others(directory)
    if writable:
        log.warning("%s: %s; hashing every byte", directory, writable)
        return False
    record = last_verification(directory)
    if record is None or not record.ok or record.manifest_changed:
        why = "no passed verification on record" if record is None or not record.ok else "the manifest changed since"
        log.warning("%s: %s; hashing every byte", directory, why)
        return False
    changed = [s.name for s in shards if record.identities.get(s.name) != s.identity]
    if changed:
        log.warning("%s: %s changed since it was verified; hashing every byte", directory, changed[0])
        return False
    return True


def _writable_by_others(directory: Path) -> str | None:
    """Why a record here could have been planted by someone we do not trust, or None."""
    for path in (directory, directory / RECORD_NAME):
        try:
            st = os.lstat(path)
        except OSError:
            return None  # no record: last_verification says so
        if st.st_uid not in (0, os.geteuid()):
            return f"{path} belongs to uid {st.st_uid}, so its verification record is not trusted"
        if st.st_mode & 0o022:
            return f"{path} is writable by others, so its verification record is not trusted"
    return None
