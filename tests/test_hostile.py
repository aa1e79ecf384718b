"""A directory someone else can write, and a service that runs prewarm over it.

Every test here runs the real CLI on real files: planted symlinks and hard links, manifests that
name files elsewhere, FIFOs and sockets, read-only bind mounts, a tmpfs, the unprivileged user
nobody, damaged records and names no terminal should print raw. Links are planted as root in a
0755 directory, so the kernel's fs.protected_symlinks (which guards only sticky world-writable
directories) cannot be what keeps prewarm from following them. inotify(7) is the independent
witness that a file outside the directory was never opened; util-linux fincore(1) the independent
witness of page-cache residency.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import socket
import stat
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import xxhash

from prewarm.pagecache import PAGE_SIZE
from tests.helpers import ROOT, assert_clean_failure, listing, run_prewarm

MANIFEST = "prewarm.manifest.json"
RECORD = ".prewarm-verified.json"
INDEX = "model.safetensors.index.json"
SHARDS = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
HANG = 20  # seconds: a command still running by then is stuck on something it opened
PROBLEM_KINDS = ("missing", "extra", "size", "corrupt", "unreadable", "refused")

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="mounts and another user need root (CI and the dev machines run as root)"
)


# --- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def serving_master(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model resharded by the CLI into 3 shards, with its manifest. Do not modify."""
    dst = tmp_path_factory.mktemp("hostile") / "serving"
    proc = run_prewarm("reshard", tiny_model, dst, "--max-shard-size", "1.5MB", check=True)
    assert ": 3 shards," in proc.stdout, proc.stdout
    assert sorted(p.name for p in dst.glob("*.safetensors")) == SHARDS
    return dst


@pytest.fixture
def serving(serving_master: Path, tmp_path: Path) -> Path:
    """A private copy of the serving directory that a test may damage."""
    return Path(shutil.copytree(serving_master, tmp_path / "serving", symlinks=True))


@pytest.fixture
def shared_serving(serving_master: Path, shared_dir: Path) -> Path:
    """A root-owned 0755 serving directory of root-owned 0644 files: nobody may read, not write."""
    served = Path(shutil.copytree(serving_master, shared_dir / "serving"))
    served.chmod(0o755)
    for f in served.iterdir():
        f.chmod(0o644)
    return served


@pytest.fixture(scope="module")
def big_serving(synthetic_7b_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("hostile-big") / "serving"
    run_prewarm("-q", "reshard", synthetic_7b_small, dst, "--max-shard-size", "90MB", check=True)
    return dst


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """``mounts("tmpfs")`` or ``mounts("ro", SRC)``: a fresh mount point, unmounted at teardown."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root (CI and the dev machines run as root)")
    points: list[Path] = []

    def mount(kind: str, source: Path | None = None) -> Path:
        point = tmp_path / f"mnt{len(points)}"
        point.mkdir()
        if kind == "tmpfs":
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0755", "tmpfs", str(point)], check=True)
            points.append(point)
        else:
            subprocess.run(["mount", "--bind", str(source), str(point)], check=True)
            points.append(point)
            subprocess.run(["mount", "-o", "remount,bind,ro", str(point)], check=True)
        return point

    yield mount
    for point in reversed(points):
        subprocess.run(["umount", str(point)], check=False)


def as_nobody(*args: str | Path, timeout: float = HANG) -> subprocess.CompletedProcess[str]:
    """The real CLI as the unprivileged user nobody, with no supplementary groups."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PREWARM_DEBUG", None)
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "prewarm", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd="/",
        check=False,
    )


def fincore(path: Path) -> int:
    """Resident bytes as util-linux fincore(1) reports them (whole pages), asked as root."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)], capture_output=True, text=True, check=True
    ).stdout
    return int(out.split()[0])


def serving_names(directory: Path) -> list[str]:
    """The regular, non-hidden files of a flat serving directory (what status lists)."""
    return sorted(e.name for e in os.scandir(directory) if e.is_file(follow_symlinks=False) and not e.name.startswith("."))


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def warnings_in(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("WARNING:")]


def state(path: Path) -> tuple[bytes, int, int, int]:
    """What must not change about a file outside the directory: bytes, mode, owner, inode."""
    st = os.lstat(path)
    return path.read_bytes(), stat.S_IMODE(st.st_mode), st.st_uid, st.st_ino


def make_secret(path: Path, data: bytes = b"root only: prewarm must never write here\n") -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def next_pids(count: int = 64) -> range:
    """The pids the next processes will most likely get (for names an old writer used: NAME.<pid>.tmp)."""
    last = int(Path("/proc/sys/kernel/ns_last_pid").read_text())
    return range(last + 1, last + 1 + count)


def bind_unix_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()
    return sock


_IN_ACCESS, _IN_MODIFY, _IN_OPEN = 0x1, 0x2, 0x20
_libc = ctypes.CDLL(None, use_errno=True)


class OpenWatch:
    """inotify(7) on files outside the directory: whether anything opened, read or wrote them."""

    def __init__(self, *paths: Path) -> None:
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        self.paths: dict[int, Path] = {}
        for path in paths:
            wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), _IN_ACCESS | _IN_MODIFY | _IN_OPEN)
            assert wd >= 0, (path, os.strerror(ctypes.get_errno()))
            self.paths[wd] = path

    def touched(self) -> list[tuple[Path, int]]:
        """(path, inotify mask) of every event since the watch began."""
        events = []
        with contextlib.suppress(BlockingIOError):
            while data := os.read(self.fd, 65536):
                offset = 0
                while offset < len(data):
                    wd, mask, _cookie, length = struct.unpack_from("iIII", data, offset)
                    events.append((self.paths.get(wd, Path("?")), mask))
                    offset += 16 + length
        return events

    def __enter__(self) -> OpenWatch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        os.close(self.fd)


# --- 1. writes never follow a planted link -------------------------------------------------------


@pytest.fixture(params=["disk", "tmpfs"])
def place(request: pytest.FixtureRequest, tmp_path: Path, mounts: Callable[..., Path]) -> Path:
    """Where the serving directory and the outside file live: the test's ext4 tmp, or a fresh tmpfs."""
    if request.param == "tmpfs":
        return mounts("tmpfs")
    base = tmp_path / "disk"
    base.mkdir()
    return base


def _plant(directory: Path, name: str, target: Path, how: str) -> None:
    if how == "symlink":
        (directory / name).symlink_to(target)
    else:
        os.link(target, directory / name)


@needs_root
@pytest.mark.parametrize("how", ["symlink", "hardlink"])
def test_verify_writes_its_record_past_a_planted_link(serving_master: Path, place: Path, how: str) -> None:
    served = Path(shutil.copytree(serving_master, place / "serving"))
    secret = make_secret(place / "secret")
    before = state(secret)
    _plant(served, RECORD, secret, how)
    decoys = [f"{RECORD}.tmp"] + [f"{RECORD}{sep}{pid}.tmp" for pid in next_pids() for sep in (".prewarm-", ".")]
    for name in decoys:
        (served / name).symlink_to(secret)
    names_before = set(os.listdir(served))

    proc = run_prewarm("verify", served, timeout=HANG)

    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert not warnings_in(proc.stderr), proc.stderr
    assert state(secret)[:3] == before[:3], "the file outside the directory was written through a planted link"
    st = os.lstat(served / RECORD)
    assert stat.S_ISREG(st.st_mode) and st.st_ino != before[3], "the record must be a new regular file"
    assert json.loads((served / RECORD).read_bytes())["ok"] is True
    assert set(os.listdir(served)) == names_before, "no temp file is left behind"
    status = json.loads(run_prewarm("status", served, "--json", check=True).stdout)
    assert status["last_verification"]["ok"] is True and status["last_verification"]["manifest_changed"] is False


@needs_root
@pytest.mark.parametrize("how", ["symlink", "hardlink"])
def test_manifest_writes_past_a_planted_link(serving_master: Path, place: Path, how: str) -> None:
    served = Path(shutil.copytree(serving_master, place / "serving"))
    secret = make_secret(place / "secret", b'{"format": "not yours"}\n')
    before = state(secret)
    (served / MANIFEST).unlink()
    _plant(served, MANIFEST, secret, how)
    decoys = [f"{MANIFEST}.tmp"] + [f"{MANIFEST}.prewarm-{pid}.tmp" for pid in next_pids()]
    for name in decoys:
        (served / name).symlink_to(secret)

    proc = run_prewarm("manifest", served, "--json", timeout=HANG)

    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert state(secret)[:3] == before[:3], "the file outside the directory was written through a planted link"
    st = os.lstat(served / MANIFEST)
    assert stat.S_ISREG(st.st_mode) and st.st_ino != before[3]
    written = json.loads((served / MANIFEST).read_bytes())
    assert written["format"] == "prewarm-manifest"
    assert not set(decoys) & set(written["files"]), "links to a file outside are not hashed"
    assert {s["name"] for s in json.loads(proc.stdout)["skipped"]} == set(decoys)
    for name in decoys:
        (served / name).unlink()
    assert run_prewarm("verify", served, timeout=HANG).returncode == 0


# --- 2. names read from a manifest stay inside the directory -------------------------------------


def _digest_entry(data: bytes) -> dict[str, object]:
    return {
        "size": len(data),
        "xxh3_128": xxhash.xxh3_128(data).hexdigest(),
        "chunks": [xxhash.xxh3_128(data).hexdigest()] if data else [],
    }


@pytest.mark.parametrize(
    "name", ["../../etc/passwd", "/etc/shadow", "a/../../x", "", "a\0b", "../x", "ABSOLUTE-FIFO", "./config.json", "a//b"]
)
def test_a_manifest_naming_a_file_outside_is_refused_unopened(serving_master: Path, tmp_path: Path, name: str) -> None:
    top = tmp_path / "top"
    served = Path(shutil.copytree(serving_master, top / "serving"))
    (served / "a").mkdir()  # so that a/../../x resolves to top/x for the kernel too
    (tmp_path / "etc").mkdir()
    fifos = [top / "x", tmp_path / "etc" / "passwd"]  # where ../x, a/../../x and ../../etc/passwd lead
    for fifo in fifos:
        os.mkfifo(fifo)
    if name == "ABSOLUTE-FIFO":
        name = str(top / "x")
    doc = json.loads((served / MANIFEST).read_bytes())
    doc["files"][name] = _digest_entry(b"")
    (served / MANIFEST).write_text(json.dumps(doc))

    with OpenWatch(*fifos) as watch:
        proc = run_prewarm("verify", served, timeout=HANG)  # opening a FIFO without O_NONBLOCK would hang here
        touched = watch.touched()

    assert_clean_failure(proc, 3, MANIFEST, repr(name))
    assert touched == [], f"verify opened a file outside the directory: {touched}"
    assert not (served / RECORD).exists(), "a manifest that cannot be read verifies nothing"


@pytest.mark.parametrize("how", ["absolute", "relative", "through a second link"])
def test_a_symlink_leading_outside_fails_verify_even_with_the_right_hash(serving: Path, tmp_path: Path, how: str) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    target = outside / "config.json"
    shutil.move(serving / "config.json", target)  # the bytes the manifest lists, now outside
    if how == "absolute":
        (serving / "config.json").symlink_to(target)
    elif how == "relative":
        (serving / "config.json").symlink_to(os.path.relpath(target, serving))
    else:
        (serving / ".hop").symlink_to(target)
        (serving / "config.json").symlink_to(".hop")

    with OpenWatch(target) as watch:
        proc = run_prewarm("verify", serving, "--json", timeout=HANG)
        touched = watch.touched()

    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    problems = json.loads(proc.stdout)["problems"]
    assert [(p["file"], p["kind"]) for p in problems] == [("config.json", "refused")], problems
    assert touched == [], f"verify opened the file outside: {touched}"
    human = run_prewarm("verify", serving, timeout=HANG)
    assert human.returncode == 1 and re.search(r"^refused\s+config\.json", human.stdout, re.M), human.stdout


@pytest.mark.parametrize("kind", ["fifo", "socket"])
def test_a_fifo_or_socket_named_in_the_manifest_is_refused_without_hanging(serving: Path, kind: str) -> None:
    (serving / "config.json").unlink()
    sock = None
    if kind == "fifo":
        os.mkfifo(serving / "config.json")
    else:
        sock = bind_unix_socket(serving / "config.json")
    try:
        proc = run_prewarm("verify", serving, "--json", timeout=HANG)
    finally:
        if sock is not None:
            sock.close()
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    problems = json.loads(proc.stdout)["problems"]
    assert [(p["file"], p["kind"]) for p in problems] == [("config.json", "refused")], problems


# --- 3. reshard never widens access --------------------------------------------------------------


def _modes(directory: Path) -> dict[str, int]:
    return {e.name: stat.S_IMODE(e.stat(follow_symlinks=False).st_mode) for e in os.scandir(directory)}


@needs_root
def test_reshard_keeps_private_weights_private_and_copies_no_outside_link(model_copy: Path, tmp_path: Path) -> None:
    src = model_copy
    for shard in src.glob("*.safetensors"):
        shard.chmod(0o600)
    (src / "tokenizer.json").chmod(0o640)
    secret = tmp_path / "secret_config.json"
    secret.write_text('{"api_key": "not for the serving directory"}')
    secret.chmod(0o640)
    (src / "extra_config.json").symlink_to(secret)
    (src / "shadow.txt").symlink_to("/etc/shadow")
    dst = tmp_path / "dst"

    proc = run_prewarm("reshard", src, dst, "--max-shard-size", "1.5MB", umask=0)  # the modes come from SRC, not the umask

    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    modes = _modes(dst)
    for name in [*SHARDS, INDEX, MANIFEST]:
        assert modes[name] & 0o177 == 0, f"{name} is {oct(modes[name])}, the weights were 0600"
    assert modes["tokenizer.json"] & ~0o640 == 0, oct(modes["tokenizer.json"])
    assert all(mode & 0o133 == 0 for mode in modes.values()), modes  # nothing writable by others, nothing executable
    assert "extra_config.json" not in modes and "shadow.txt" not in modes
    assert not any(p.is_symlink() for p in dst.iterdir())
    warned = warnings_in(proc.stderr)
    assert any("extra_config.json" in w for w in warned) and any("shadow.txt" in w for w in warned), proc.stderr
    assert run_prewarm("verify", dst, timeout=HANG).returncode == 0


@needs_root
def test_reshard_of_one_private_model_safetensors(tiny_model: Path, tmp_path: Path) -> None:
    one = tmp_path / "one"
    run_prewarm("reshard", tiny_model, one, "--max-shard-size", "10MB", check=True)
    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(one / "model-00001-of-00001.safetensors", src / "model.safetensors")
    (src / "model.safetensors").chmod(0o600)
    shutil.copyfile(tiny_model / "config.json", src / "config.json")
    (src / "config.json").chmod(0o644)
    dst = tmp_path / "dst"
    proc = run_prewarm("reshard", src, dst, "--max-shard-size", "1.5MB", umask=0)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    modes = _modes(dst)
    assert sorted(n for n in modes if n.endswith(".safetensors")) == SHARDS
    for name in [*SHARDS, INDEX, MANIFEST]:
        assert modes[name] & 0o177 == 0, f"{name} is {oct(modes[name])}, model.safetensors was 0600"
    assert modes["config.json"] & ~0o644 == 0


def test_reshard_of_a_hub_cache_snapshot_follows_its_blob_links(tiny_model: Path, tmp_path: Path) -> None:
    repo = tmp_path / "models--owner--tiny"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in tiny_model.iterdir():
        blob = xxhash.xxh3_128(f.read_bytes()).hexdigest() + f.name  # unique even for equal bytes
        shutil.copyfile(f, blobs / blob)
        (snapshot / f.name).symlink_to(f"../../blobs/{blob}")
    dst = tmp_path / "dst"

    proc = run_prewarm("reshard", snapshot, dst, "--max-shard-size", "1.5MB")

    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert not warnings_in(proc.stderr), proc.stderr
    assert sorted(p.name for p in dst.glob("*.safetensors")) == SHARDS
    assert not any(p.is_symlink() for p in dst.iterdir())
    assert (dst / "tokenizer.json").read_bytes() == (tiny_model / "tokenizer.json").read_bytes()
    assert run_prewarm("verify", dst, timeout=HANG).returncode == 0


# --- 4. truthful results -------------------------------------------------------------------------


def _corrupt_three(directory: Path) -> None:
    for i, shard in enumerate(SHARDS):
        flip(directory / shard, 1000 + 123_457 * i)


def _assert_three_corrupt(proc: subprocess.CompletedProcess[str], why: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Error:" not in proc.stderr, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is False
    assert sorted((p["file"], p["kind"]) for p in report["problems"]) == [(s, "corrupt") for s in SHARDS]
    warned = warnings_in(proc.stderr)
    assert len(warned) == 1 and "could not record" in warned[0] and why in warned[0], proc.stderr


@needs_root
def test_verify_on_a_read_only_mount_reports_its_findings(serving: Path, mounts: Callable[..., Path]) -> None:
    _corrupt_three(serving)
    ro = mounts("ro", serving)

    _assert_three_corrupt(run_prewarm("verify", ro, "--json", timeout=HANG), "read-only")
    human = run_prewarm("verify", ro, timeout=HANG)
    assert human.returncode == 1, (human.stdout, human.stderr)
    assert [line.split()[:2] for line in human.stdout.splitlines() if line.startswith("corrupt")] == [
        ["corrupt", s] for s in SHARDS
    ]
    assert "FAILED: 3 problems" in human.stdout
    assert not (serving / RECORD).exists()


@needs_root
def test_verify_as_nobody_reports_its_findings_where_it_cannot_write(shared_serving: Path) -> None:
    _corrupt_three(shared_serving)
    _assert_three_corrupt(as_nobody("verify", shared_serving, "--json"), "permission denied")
    assert not (shared_serving / RECORD).exists()


@needs_root
def test_residency_of_files_nobody_may_not_write_is_unknown_not_claimed(shared_serving: Path) -> None:
    names = serving_names(shared_serving)
    total = sum((shared_serving / n).stat().st_size for n in names)
    assert run_prewarm("evict", shared_serving, timeout=HANG).returncode == 0
    assert sum(fincore(shared_serving / n) for n in names) == 0

    proc = as_nobody("warm", shared_serving, "--json")
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    report = json.loads(proc.stdout)
    assert report["total_bytes"] == total
    assert report["bytes_read"] == total, "a file whose residency is unknown is read whole"
    assert report["unknown_bytes"] == total
    assert report["resident_bytes"] == 0, "nobody cannot know, so it must not claim residency"
    assert all(f["resident_bytes"] is None for f in report["files"]), report["files"]
    assert all(fincore(shared_serving / n) >= (shared_serving / n).stat().st_size for n in names), "it did read them"

    status = as_nobody("status", shared_serving, "--json")
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert sorted(f["name"] for f in doc["files"]) == names
    assert all(f["resident_bytes"] is None for f in doc["files"]), doc["files"]
    assert doc["resident_bytes"] == 0 and doc["unknown_bytes"] == total
    human = as_nobody("status", shared_serving)
    assert human.returncode == 0 and "%" not in "".join(line for line in human.stdout.splitlines() if line.split()[0] in names), (
        human.stdout
    )

    as_root = json.loads(run_prewarm("status", shared_serving, "--json", check=True, timeout=HANG).stdout)
    assert as_root["unknown_bytes"] == 0
    for f in as_root["files"]:
        assert abs(f["resident_bytes"] - fincore(shared_serving / f["name"])) < PAGE_SIZE, f
    assert as_root["resident_bytes"] == total

    evicted = as_nobody("evict", shared_serving, "--json")
    assert evicted.returncode == 0, evicted.stderr
    doc = json.loads(evicted.stdout)
    for when in ("before", "after"):
        assert doc[when]["unknown_bytes"] == total and doc[when]["resident_bytes"] == 0, doc[when]
        assert all(f["resident_bytes"] is None for f in doc[when]["files"])
    as_root = json.loads(run_prewarm("status", shared_serving, "--json", check=True, timeout=HANG).stdout)
    for f in as_root["files"]:
        assert f["resident_bytes"] == 0 == fincore(shared_serving / f["name"]), f


def test_warm_budget_caps_what_becomes_resident(big_serving: Path) -> None:
    names = serving_names(big_serving)
    total = sum((big_serving / n).stat().st_size for n in names)
    assert total > 150_000_000
    run_prewarm("evict", big_serving, check=True, timeout=HANG)
    assert sum(fincore(big_serving / n) for n in names) == 0
    try:
        proc = run_prewarm("warm", big_serving, "--budget", "10MB", "--json", timeout=60)
        resident = sum(fincore(big_serving / n) for n in names)
    finally:
        run_prewarm("evict", big_serving, timeout=HANG)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    report = json.loads(proc.stdout)
    assert report["limited_by_memory"] is True and report["bytes_read"] <= 10_000_000
    assert resident <= 10_000_000 + 64 * 1024, f"{resident} bytes resident after a 10 MB budget"
    assert resident >= 9_000_000, f"only {resident} bytes resident: the budget was not used"


def test_status_never_shows_more_than_all_of_a_shrunken_file(serving: Path) -> None:
    run_prewarm("warm", serving, check=True, timeout=HANG)
    victim = serving / SHARDS[1]
    os.truncate(victim, victim.stat().st_size // 2)  # not a whole number of pages
    proc = run_prewarm("status", serving, "--json", timeout=HANG)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    for f in doc["files"]:
        assert 0 <= f["resident_bytes"] <= f["bytes"], f
    assert doc["resident_bytes"] <= doc["total_bytes"]
    shrunk = next(f for f in doc["files"] if f["name"] == SHARDS[1])
    assert shrunk["bytes"] == victim.stat().st_size and abs(shrunk["resident_bytes"] - fincore(victim)) < PAGE_SIZE
    human = run_prewarm("status", serving, timeout=HANG)
    shares = [int(p) for p in re.findall(r"(\d+)%", human.stdout)]
    assert shares and max(shares) <= 100, human.stdout


def test_a_copy_made_with_cp_a_keeps_its_verification(serving: Path, tmp_path: Path) -> None:
    run_prewarm("verify", serving, check=True, timeout=HANG)
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(serving), str(copy)], check=True)
    assert (copy / RECORD).is_file()
    last = json.loads(run_prewarm("status", copy, "--json", check=True, timeout=HANG).stdout)["last_verification"]
    assert last is not None and last["ok"] is True and last["manifest_changed"] is False, last
    with open(copy / MANIFEST, "ab") as f:
        f.write(b"\n")
    last = json.loads(run_prewarm("status", copy, "--json", check=True, timeout=HANG).stdout)["last_verification"]
    assert last["manifest_changed"] is True, "a rewritten manifest is not the one verified"


def test_status_does_not_warm(serving: Path) -> None:
    run_prewarm("verify", serving, check=True, timeout=HANG)  # a record for status to read
    run_prewarm("evict", serving, check=True, timeout=HANG)
    names = serving_names(serving)
    assert MANIFEST in names and all(fincore(serving / n) == 0 for n in names)
    for args in (("status", serving), ("status", serving, "--json")):
        proc = run_prewarm(*args, check=True, timeout=HANG)
        if "--json" in args:
            assert json.loads(proc.stdout)["resident_bytes"] == 0
        else:
            assert "last verified" in proc.stdout
    assert {n: fincore(serving / n) for n in names} == dict.fromkeys(names, 0), "status brought pages into the cache"


# --- 5. never hang, never a traceback ------------------------------------------------------------


@pytest.fixture
def with_fifo_and_socket(serving: Path) -> Iterator[Path]:
    os.mkfifo(serving / "pipe")
    sock = bind_unix_socket(serving / "sock")
    yield serving
    sock.close()


@pytest.mark.parametrize("command", ["status", "warm", "evict", "manifest"])
def test_a_fifo_and_a_socket_are_skipped_with_a_warning(with_fifo_and_socket: Path, command: str) -> None:
    served = with_fifo_and_socket
    proc = run_prewarm(command, served, "--json", timeout=HANG)
    assert "Traceback" not in proc.stderr and "Error:" not in proc.stderr, proc.stderr
    warned = warnings_in(proc.stderr)
    assert any("pipe" in w and "FIFO" in w for w in warned), proc.stderr
    assert any("sock" in w and "socket" in w for w in warned), proc.stderr
    doc = json.loads(proc.stdout)
    if command == "warm":
        assert proc.returncode in (0, 1), proc.stderr
        assert all(fincore(served / n) >= (served / n).stat().st_size for n in serving_names(served))
    else:
        assert proc.returncode == 0, proc.stderr
    if command == "manifest":
        written = json.loads((served / MANIFEST).read_bytes())["files"]
        assert "pipe" not in written and "sock" not in written and "config.json" in written
        assert sorted(s["name"] for s in doc["skipped"]) == ["pipe", "sock"]
    elif command == "evict":
        assert sorted(s["name"] for s in doc["after"]["skipped"]) == ["pipe", "sock"]
    else:
        assert sorted(s["name"] for s in doc["skipped"]) == ["pipe", "sock"]


def test_verify_names_a_fifo_and_a_socket_as_extra_without_opening_them(with_fifo_and_socket: Path) -> None:
    served = with_fifo_and_socket
    with OpenWatch(served / "pipe") as watch:
        proc = run_prewarm("verify", served, "--json", timeout=HANG)
        touched = watch.touched()
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    problems = {p["file"]: p for p in json.loads(proc.stdout)["problems"]}
    assert sorted(problems) == ["pipe", "sock"]
    assert problems["pipe"]["kind"] == "extra" and "FIFO" in problems["pipe"]["detail"]
    assert problems["sock"]["kind"] == "extra" and "socket" in problems["sock"]["detail"]
    assert touched == [], touched


@pytest.mark.parametrize("command", ["verify", "status", "warm", "evict"])
def test_a_fifo_at_the_manifest_name_does_not_hang(serving: Path, command: str) -> None:
    (serving / MANIFEST).unlink()
    os.mkfifo(serving / MANIFEST)
    proc = run_prewarm(command, serving, timeout=HANG)
    assert "Traceback" not in proc.stderr, proc.stderr
    if command == "verify":
        assert_clean_failure(proc, 3, MANIFEST, "FIFO")
    else:
        assert any(MANIFEST in w and "FIFO" in w for w in warnings_in(proc.stderr)), proc.stderr


def _spawn_into_closed_pipe(args: list[str]) -> subprocess.CompletedProcess[str]:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before prewarm writes a byte
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PREWARM_DEBUG", None)
    try:
        return subprocess.run(
            [sys.executable, "-m", "prewarm", *args], stdout=write_end, stderr=subprocess.PIPE, text=True, env=env, timeout=HANG
        )
    finally:
        os.close(write_end)


@pytest.mark.parametrize(
    "args",
    [
        ["verify"],
        ["verify", "--json"],
        ["verify", "CORRUPT"],
        ["status"],
        ["status", "--json"],
        ["warm"],
        ["evict"],
        ["manifest"],
    ],
)
def test_a_reader_gone_away_is_exit_141_and_silence(serving: Path, args: list[str]) -> None:
    if "CORRUPT" in args:
        flip(serving / SHARDS[0], 5000)
        args = [a for a in args if a != "CORRUPT"]
    proc = _spawn_into_closed_pipe([args[0], str(serving), *args[1:]])
    assert proc.returncode == 141, (proc.returncode, proc.stderr)
    assert proc.stderr == "", proc.stderr


def test_a_reader_closing_its_end_at_once_is_exit_141(serving: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PREWARM_DEBUG", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "prewarm", "verify", str(serving)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    assert proc.stdout is not None
    proc.stdout.close()  # long before the interpreter has started, let alone verified
    try:
        _, stderr = proc.communicate(timeout=HANG)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 141, (proc.returncode, stderr)
    assert stderr == b"", stderr


def _valid_record(served: Path, **overrides: object) -> bytes:
    doc = {
        "verified_at": 1_700_000_000.0,
        "ok": True,
        "problems": 0,
        "manifest_xxh3_128": xxhash.xxh3_128((served / MANIFEST).read_bytes()).hexdigest(),
    }
    return json.dumps(doc | overrides).encode()


DAMAGED: dict[str, Callable[[Path], bytes | str]] = {
    "not JSON": lambda d: b"{not json",
    "empty": lambda d: b"",
    "not UTF-8": lambda d: b'{"ok": "\xff\xfe"}',
    "nested 100000 deep": lambda d: b"[" * 100_000,
    "nested objects": lambda d: b'{"a":' * 100_000,
    "a JSON list": lambda d: b"[1, 2, 3]",
    "a JSON string": lambda d: b'"ok"',
    "verified_at as words": lambda d: _valid_record(d, verified_at="yesterday"),
    "verified_at past the end of time": lambda d: _valid_record(d, verified_at=1e300),
    "verified_at NaN": lambda d: _valid_record(d).replace(b"1700000000.0", b"NaN"),
    "ok as a string": lambda d: _valid_record(d, ok="false"),
    "problems as a list": lambda d: _valid_record(d, problems=[1]),
    "problems as a float": lambda d: _valid_record(d, problems=2.5),
    "fields missing": lambda d: b'{"ok": true}',
    "too large": lambda d: b" " * (2 << 20) + _valid_record(d),
    "a FIFO": lambda d: "fifo",
    "a directory": lambda d: "dir",
    "a symlink to a valid record outside": lambda d: "symlink",
    "a symlink to /etc/shadow": lambda d: "shadow",
}


@pytest.mark.parametrize("damage", list(DAMAGED))
def test_a_damaged_record_is_ignored_with_a_warning(serving: Path, tmp_path: Path, damage: str) -> None:
    record = serving / RECORD
    made = DAMAGED[damage](serving)
    if made == "fifo":
        os.mkfifo(record)
    elif made == "dir":
        record.mkdir()
    elif made == "symlink":
        outside = tmp_path / "outside-record.json"
        outside.write_bytes(_valid_record(serving))
        record.symlink_to(outside)
    elif made == "shadow":
        record.symlink_to("/etc/shadow")
    else:
        assert isinstance(made, bytes)
        record.write_bytes(made)

    human = run_prewarm("status", serving, timeout=HANG)
    assert human.returncode == 0, (human.stdout, human.stderr)
    assert "Traceback" not in human.stderr and "Error:" not in human.stderr, human.stderr
    warned = warnings_in(human.stderr)
    assert any(RECORD in w and "ignoring" in w for w in warned), human.stderr
    assert "manifest: never verified" in human.stdout, human.stdout
    as_json = run_prewarm("status", serving, "--json", timeout=HANG)
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["last_verification"] is None


# --- 6. messages ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["manifest", ""],
        ["verify", ""],
        ["verify", "", "--json"],
        ["manifest", "  "],
        ["status", ""],
        ["warm", ""],
        ["evict", ""],
        ["reshard", "", "dst"],
        ["reshard", "TINY", ""],
    ],
)
def test_an_empty_path_is_a_usage_error_not_the_current_directory(tiny_model: Path, tmp_path: Path, args: list[str]) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "notes.txt").write_text("a file the user keeps here\n")
    args = [str(tiny_model) if a == "TINY" else a for a in args]
    proc = run_prewarm(*args, cwd=cwd, timeout=HANG)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "empty" in proc.stderr, proc.stderr
    assert listing(cwd) == ["notes.txt"], "nothing is written into the current directory"


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["verify", "MISSING", "--json"], 4, "no such directory"),
        (["verify", "--json", "MISSING"], 4, "no such directory"),
        (["status", "MISSING", "--json"], 4, "no such directory"),
        (["warm", "MISSING", "--json"], 4, "no such directory"),
        (["evict", "MISSING", "--json"], 4, "no such directory"),
        (["manifest", "MISSING", "--json"], 4, "no such directory"),
        (["reshard", "MISSING", "OUT", "--json"], 4, "MISSING"),
        (["verify", "EMPTY", "--json"], 3, "no prewarm.manifest.json here"),
    ],
)
def test_a_failure_with_json_is_json_on_stdout_and_lines_on_stderr(
    tmp_path: Path, args: list[str], code: int, needle: str
) -> None:
    (tmp_path / "empty").mkdir()
    paths = {"MISSING": str(tmp_path / "nonexistent"), "OUT": str(tmp_path / "out"), "EMPTY": str(tmp_path / "empty")}
    needle = paths.get(needle, needle)
    proc = run_prewarm(*[paths.get(a, a) for a in args], timeout=HANG)
    assert_clean_failure(proc, code, needle)
    assert any(line.strip().startswith("hint:") for line in proc.stderr.splitlines()), proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["ok"] is False
    error = doc["error"]
    assert error["exit_code"] == code
    assert isinstance(error["message"], str) and error["message"] and (needle in error["message"] or needle == error["path"])
    assert isinstance(error["hint"], str) and error["hint"]


def test_names_with_a_newline_or_bytes_that_are_not_utf8_print_escaped(serving: Path) -> None:
    newline = "a\nb.json"
    (serving / newline).write_bytes(b'{"x": 1}')
    fd = os.open(os.fsencode(str(serving)) + b"/\xff.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, b'{"y": 2}')
    os.close(fd)
    os.mkfifo(serving / "fifo\nWARNING: forged")
    odd = {b"a\nb.json", b"\xff.json"}

    made = run_prewarm("manifest", serving, timeout=HANG, errors="surrogateescape")
    assert made.returncode == 0, (made.stdout, made.stderr)
    assert [line.split()[0] for line in made.stdout.splitlines()] == ["Wrote"], made.stdout
    assert all(line.startswith("WARNING: ") for line in made.stderr.splitlines()), made.stderr
    assert len(made.stderr.splitlines()) == 1 and "fifo\\nWARNING: forged" in made.stderr, made.stderr
    listed = {os.fsencode(name) for name in json.loads((serving / MANIFEST).read_bytes())["files"]}
    assert odd <= listed

    for name in odd:
        with open(os.fsencode(str(serving)) + b"/" + name, "ab") as f:
            f.write(b" ")
    human = run_prewarm("verify", serving, timeout=HANG, errors="surrogateescape")
    assert human.returncode == 1, (human.stdout, human.stderr)
    lines = human.stdout.splitlines()
    assert all(line.split(" ", 1)[0] in (*PROBLEM_KINDS, "FAILED:", "OK:") for line in lines), human.stdout
    assert any(line.startswith("size") and "a\\nb.json" in line for line in lines), human.stdout
    assert any(line.startswith("size") and "\\xff.json" in line for line in lines), human.stdout
    as_json = run_prewarm("verify", serving, "--json", timeout=HANG)
    assert as_json.returncode == 1
    problems = json.loads(as_json.stdout)["problems"]
    assert {os.fsencode(p["file"]) for p in problems if p["kind"] == "size"} == odd
    assert {os.fsencode(p["file"]) for p in problems if p["kind"] == "extra"} == {b"fifo\nWARNING: forged"}

    status = run_prewarm("status", serving, timeout=HANG, errors="surrogateescape")
    assert status.returncode == 0, status.stderr
    shown = {*serving_names(serving), "a\\nb.json", "\\xff.json", "total", "manifest:"}
    assert all(line.split()[0] in shown for line in status.stdout.splitlines()), status.stdout
    status_json = json.loads(run_prewarm("status", serving, "--json", timeout=HANG).stdout)
    assert odd <= {os.fsencode(f["name"]) for f in status_json["files"]}


def test_one_shard_is_said_in_the_singular(tiny_model: Path, tmp_path: Path) -> None:
    proc = run_prewarm("reshard", tiny_model, tmp_path / "one", "--max-shard-size", "10MB", check=True)
    assert ": 1 shard," in proc.stdout.splitlines()[0], proc.stdout
    assert "1 shards" not in proc.stdout
