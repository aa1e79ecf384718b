"""The prewarm load format's reader against vLLM's default ways to put safetensors on a GPU (issue 11).

Needs torch with CUDA and safetensors (not vLLM): it times what the loader does before vLLM's
weight loaders see a tensor. On the 15.23 GB Qwen2.5-7B-shaped synthetic checkpoint, warm page
cache, rotated rounds, in one process:

- ``safe_open_to``: safe_open, get_tensor, ``.to("cuda")`` per tensor (vLLM's default iterator);
- ``load_file_cuda``: ``safetensors.torch.load_file(device="cuda")`` per shard;
- ``prewarm_hash``: prewarm.loader.CheckedReader onto cuda, every 16 MiB chunk hashed;
- ``prewarm_record``: the same with ``check = "record"`` after a passed verification (no hashing);
- variants of threads and hash piece size, and two ceilings measured in the same run: pinned
  host-to-device copies, and reading (and hashing) the page cache into pinned buffers alone.

Each round frees the GPU's cached blocks and torch's cached pinned host memory first, so every
load pays for its allocations as an engine's first load does. Then every tensor prewarm put on
the GPU is compared byte for byte with ``load_file(device="cuda")``.

    python3 bench/bench_loader.py --data /tmp/bench-loader --rounds 3 --json > result.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import load_file

from prewarm.loader import CheckedReader, LoadOptions, host_view
from prewarm.manifest import build_manifest, write_manifest
from prewarm.synthetic import write_qwen25_7b_like
from prewarm.verify import record_verification, verify_directory
from prewarm.warm import warm

GB = 1e9


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def shards(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def make_checkpoint(directory: Path, scale: float) -> None:
    if (directory / "prewarm.manifest.json").exists():
        return
    started = time.perf_counter()
    write_qwen25_7b_like(directory, scale=scale)
    built = build_manifest(directory)
    write_manifest(directory, built.manifest)
    log(f"checkpoint written and hashed in {time.perf_counter() - started:.1f} s")


def fresh_memory() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    empty_host = getattr(torch._C, "_host_emptyCache", None)
    if empty_host is not None:
        empty_host()


def safe_open_to(directory: Path) -> int:
    count = 0
    for path in shards(directory):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                tensor = f.get_tensor(name).to("cuda")
                count += tensor.numel() > 0
    torch.cuda.synchronize()
    return count


def load_file_cuda(directory: Path) -> int:
    count = 0
    for path in shards(directory):
        count += len(load_file(str(path), device="cuda"))
    torch.cuda.synchronize()
    return count


def prewarm_reader(options: LoadOptions) -> Callable[[Path], int]:
    def load(directory: Path) -> int:
        reader = CheckedReader(directory, "cuda", options)
        count = sum(1 for _ in reader.tensors())
        torch.cuda.synchronize()
        if options.check == "record" and reader.report.hashed:
            raise AssertionError("the trusted load hashed: the verification record was not trusted")
        return count

    return load


def pinned_copy_ceiling(total: int, block: int = 256 * 2**20) -> float:
    """GB/s of host-to-device copies from pinned memory, as many bytes as the checkpoint."""
    source = torch.empty(block, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(block, dtype=torch.uint8, device="cuda")
    target.copy_(source, non_blocking=True)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(max(1, total // block)):
        target.copy_(source, non_blocking=True)
    torch.cuda.synchronize()
    return max(1, total // block) * block / (time.perf_counter() - started) / GB


def read_ceiling(directory: Path, threads: int, hash_it: bool, chunk: int = 16 * 2**20, piece: int = 2**20) -> float:
    """GB/s of reading the page cache into pinned buffers (and hashing), no copy to the GPU."""
    files = shards(directory)
    buffers = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(threads)]
    views = [host_view(b) for b in buffers]
    jobs = [(path, offset) for path in files for offset in range(0, path.stat().st_size, chunk)]
    fds = {path: os.open(path, os.O_RDONLY) for path in files}

    def work(worker: int) -> int:
        view, done = views[worker], 0
        for path, offset in jobs[worker::threads]:
            h = xxhash.xxh3_128() if hash_it else None
            at = 0
            while at < chunk:
                got = os.preadv(fds[path], [view[at : at + piece]], offset + at)
                if got <= 0:
                    break
                if h is not None:
                    h.update(view[at : at + got])
                at += got
            done += at
        return done

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(work, range(threads)))
    seconds = time.perf_counter() - started
    for fd in fds.values():
        os.close(fd)
    return total / seconds / GB


def check_identity(directory: Path) -> dict[str, object]:
    fresh_memory()
    reader = CheckedReader(directory, "cuda", LoadOptions())
    mismatched, compared, nbytes = [], 0, 0
    loaded = dict(reader.tensors())
    for path in shards(directory):
        reference = load_file(str(path), device="cuda")
        for name, expected in reference.items():
            got = loaded.pop(name)
            same = (
                got.dtype == expected.dtype
                and got.shape == expected.shape
                and got.device.type == "cuda"
                and torch.equal(got.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8))
            )
            compared += 1
            nbytes += expected.numel() * expected.element_size()
            if not same:
                mismatched.append(name)
        del reference
    return {"tensors_compared": compared, "bytes_compared": nbytes, "mismatched": mismatched, "extra": sorted(loaded)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("/tmp/bench-loader"))
    parser.add_argument("--scale", type=float, default=1.0, help="1.0: Qwen2.5-7B's shapes, 15.23 GB")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--variants", default="t16:p8192:b2,t8:p16384:b2", help="reader settings to try too: tTHREADS:pKIB:bBUFFERS,..."
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_loader: no CUDA device here; this benchmark measures loading onto a GPU", file=sys.stderr)
        return 2

    directory = args.data
    make_checkpoint(directory, args.scale)
    total = sum(p.stat().st_size for p in shards(directory))
    started = time.perf_counter()
    record_verification(verify_directory(directory))
    log(f"verified and recorded in {time.perf_counter() - started:.2f} s")
    warmed = warm(directory)
    log(f"warm: {warmed.after.resident_bytes / GB:.2f} of {warmed.after.total_bytes / GB:.2f} GB resident")
    torch.zeros(1, device="cuda")  # the CUDA context, outside every timing

    methods: dict[str, Callable[[Path], int]] = {"safe_open_to": safe_open_to, "load_file_cuda": load_file_cuda}
    for variant in filter(None, args.variants.split(",")):
        threads, piece, buffers = (int(part[1:]) for part in variant.split(":"))
        for check in ("hash", "record"):
            options = LoadOptions(check=check, threads=threads, piece_bytes=piece * 1024, buffers=buffers)
            methods[f"prewarm_{check}_t{threads}_p{piece}k_b{buffers}"] = prewarm_reader(options)
    methods["prewarm_hash_default"] = prewarm_reader(LoadOptions())
    methods["prewarm_record_default"] = prewarm_reader(LoadOptions(check="record"))

    times: dict[str, list[float]] = {name: [] for name in methods}
    for round_ in range(args.rounds):
        order = list(methods)
        order = order[round_ % len(order) :] + order[: round_ % len(order)]  # rotate
        for name in order:
            fresh_memory()
            began = time.perf_counter()
            methods[name](directory)
            times[name].append(time.perf_counter() - began)
            log(f"round {round_ + 1} {name}: {times[name][-1]:.3f} s")

    ceiling = {
        "pinned_h2d_gb_s": round(pinned_copy_ceiling(total), 2),
        "read_only_gb_s_16_threads": round(read_ceiling(directory, 16, hash_it=False), 2),
        "read_hash_gb_s_16_threads": round(read_ceiling(directory, 16, hash_it=True), 2),
    }
    fresh_memory()
    began = time.perf_counter()
    default = LoadOptions()
    count = default.resolved_threads() * default.resolved_buffers()
    pinned = [torch.empty(default.piece_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(count)]
    ceiling["pinned_alloc_s_default_buffers"] = round(time.perf_counter() - began, 4)
    fresh_memory()
    began = time.perf_counter()
    pinned = [torch.empty(16 * 2**20, dtype=torch.uint8, pin_memory=True) for _ in range(20)]
    ceiling["pinned_alloc_s_20x16MiB"] = round(time.perf_counter() - began, 4)
    del pinned
    reports = {}
    for check in ("hash", "record"):
        fresh_memory()
        reader = CheckedReader(directory, "cuda", LoadOptions(check=check))
        for _ in reader.tensors():
            pass
        reports[check] = reader.report.as_dict()
    identity = check_identity(directory)
    baseline = statistics.median(times["safe_open_to"])
    results = {
        name: {
            "median_s": round(statistics.median(ts), 3),
            "min_s": round(min(ts), 3),
            "max_s": round(max(ts), 3),
            "gb_s": round(total / statistics.median(ts) / GB, 2),
            "speedup_vs_safe_open_to": round(baseline / statistics.median(ts), 2),
        }
        for name, ts in times.items()
    }
    doc = {
        "machine": {
            "gpu": torch.cuda.get_device_name(0),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "kernel": platform.release(),
        },
        "checkpoint_bytes": total,
        "rounds": args.rounds,
        "results": results,
        "ceilings": ceiling,
        "reports": reports,
        "identity": identity,
    }
    print(json.dumps(doc, indent=1) if args.json else _table(doc))
    return 0 if not identity["mismatched"] and not identity["extra"] else 1


def _table(doc: dict[str, object]) -> str:
    results = doc["results"]
    assert isinstance(results, dict)
    lines = [f"{'method':32} {'median s':>9} {'GB/s':>7} {'x safe_open':>11}"]
    for name, r in results.items():
        lines.append(f"{name:32} {r['median_s']:>9.3f} {r['gb_s']:>7.2f} {r['speedup_vs_safe_open_to']:>11.2f}")
    lines.append(f"ceilings: {doc['ceilings']}")
    lines.append(f"identity: {doc['identity']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
