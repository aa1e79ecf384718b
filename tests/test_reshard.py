"""Resharding: round trips through the safetensors library and transformers, and bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from prewarm.checkpoint import INDEX_NAME, MANIFEST_NAME, model_order_key
from prewarm.reshard import DEFAULT_MAX_SHARD_SIZE, reshard
from prewarm.verify import verify_directory
from tests.helpers import assert_clean_failure, listing, run_prewarm, write_raw_safetensors

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.uint8,
    torch.int32,
    torch.int64,
    torch.float8_e4m3fn,
    torch.bool,
]


def _read_all(directory: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], bytes]]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                t = f.get_tensor(name)
                out[name] = (t.dtype, tuple(t.shape), _bytes_of(t))
    return out


def _bytes_of(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _random_tensor(dtype: torch.dtype, shape: list[int], seed: int) -> torch.Tensor:
    nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


tensor_specs = st.lists(
    st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 12), max_size=3), st.integers(0, 2**32 - 1)),
    min_size=1,
    max_size=14,
)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=tensor_specs, source_shards=st.integers(1, 4), fraction=st.floats(0.0, 1.0), with_index=st.booleans())
def test_round_trip_any_tensors_any_limit(
    tmp_path_factory: pytest.TempPathFactory, specs: list, source_shards: int, fraction: float, with_index: bool
) -> None:
    src = tmp_path_factory.mktemp("src")
    tensors = {f"model.layers.{i}.w": _random_tensor(dtype, shape, seed) for i, (dtype, shape, seed) in enumerate(specs)}
    names = list(tensors)
    # Headers are ~100 bytes a tensor: a limit from a share of the data spans one shard to many.
    limit = 100 * len(specs) + int(fraction * sum(t.numel() * t.element_size() for t in tensors.values()))
    weight_map = {}
    for s in range(source_shards):
        part = names[s::source_shards]
        if part:
            file = f"part{s}.safetensors"
            save_file({n: tensors[n] for n in part}, str(src / file), metadata={"format": "pt"})
            weight_map.update({n: file for n in part})
    if with_index:
        (src / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    dst = tmp_path_factory.mktemp("out") / "dst"
    try:
        result = reshard(src, dst, limit)
    except Exception as exc:  # only a tensor too big for the limit may refuse
        assert "does not fit in a shard" in str(exc)
        assert not dst.exists()
        event("refused: a tensor larger than the limit")
        return
    event(f"{len(result.shards)} output shards" if len(result.shards) < 3 else "3+ output shards")
    assert _read_all(dst) == {n: (t.dtype, tuple(t.shape), _bytes_of(t)) for n, t in tensors.items()}
    shards = sorted(dst.glob("*.safetensors"))
    assert [p.name for p in shards] == [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    assert all(p.stat().st_size <= limit for p in shards)
    assert [n for n, *_ in result.shards] == [p.name for p in shards]
    index = json.loads((dst / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert set(index["weight_map"]) == set(tensors)
    for p in shards:
        with safe_open(p, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert all(index["weight_map"][k] == p.name for k in f.keys())  # noqa: SIM118
    order = [n for p in shards for n in _data_order(p)]
    assert order == sorted(tensors, key=model_order_key)
    assert verify_directory(dst).ok


def _data_order(path: Path) -> list[str]:
    from prewarm.safetensors import read_safetensors_header

    return [t.name for t in read_safetensors_header(path).tensors]


def test_model_order_is_forward_pass_order() -> None:
    names = [
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.10.mlp.up_proj.weight",
        "model.layers.2.self_attn.q_proj.weight",
        "model.embed_tokens.weight",
        "model.layers.2.input_layernorm.weight",
    ]
    assert sorted(names, key=model_order_key) == [
        "model.embed_tokens.weight",
        "model.layers.2.input_layernorm.weight",
        "model.layers.2.self_attn.q_proj.weight",
        "model.layers.10.mlp.up_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]


def test_resharded_model_gives_the_same_logits(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    dst = tmp_path / "served"
    result = reshard(tiny_model, dst, 700_000)
    assert len(result.shards) >= 3
    ids = torch.tensor([[1, 5, 42, 7, 300, 9]])
    with torch.no_grad():
        before = AutoModelForCausalLM.from_pretrained(tiny_model)(ids).logits
        after = AutoModelForCausalLM.from_pretrained(dst)(ids).logits
    assert torch.equal(before, after)
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"} <= set(
        listing(dst)
    )


def test_same_input_gives_byte_identical_output(tiny_model: Path, tmp_path: Path) -> None:
    reshard(tiny_model, tmp_path / "a", 1_500_000)
    reshard(tiny_model, tmp_path / "b", 1_500_000)
    assert listing(tmp_path / "a") == listing(tmp_path / "b")
    for name in listing(tmp_path / "a"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_single_file_source_and_default_limit(tiny_model: Path, tmp_path: Path) -> None:
    first = sorted(tiny_model.glob("*.safetensors"))[0]
    result = reshard(first, tmp_path / "one")
    assert [n for n, *_ in result.shards] == ["model-00001-of-00001.safetensors"]
    assert result.shards[0][1] < DEFAULT_MAX_SHARD_SIZE
    assert set(_read_all(tmp_path / "one")) == {
        t
        for t in json.loads((tiny_model / INDEX_NAME).read_text())["weight_map"]
        if json.loads((tiny_model / INDEX_NAME).read_text())["weight_map"][t] == first.name
    }


def test_cli_json_summary_and_progress_lines(tiny_model: Path, tmp_path: Path) -> None:
    proc = run_prewarm("reshard", tiny_model, tmp_path / "out", "--max-shard-size", "1MB", "--json", check=True)
    summary = json.loads(proc.stdout)
    assert summary["destination"] == str(tmp_path / "out")
    assert sum(s["tensors"] for s in summary["shards"]) == 27
    assert all(s["bytes"] <= 10**6 for s in summary["shards"])
    assert set(summary["timings"]) == {"plan", "copy", "sync", "total"}
    assert proc.stderr == "", "work under a second prints no progress lines"
    assert MANIFEST_NAME in listing(tmp_path / "out")


# --- bad input: one clear line, non-zero exit, no output, nothing of the user's touched ---


def _expect_rejected(src: Path, tmp_path: Path, *needles: str, code: int = 3, extra: tuple[str, ...] = ()) -> None:
    before = listing(tmp_path)
    proc = run_prewarm("reshard", src, tmp_path / "dst", *extra)
    assert_clean_failure(proc, code, *needles)
    assert listing(tmp_path) == before, "no output and no temp files may be left"


@pytest.mark.parametrize(
    ("breakage", "needles"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-100]), ("model-00002-of-00004.safetensors", "truncated")),
        (
            lambda p: p.write_bytes(b"\xff" * 8 + p.read_bytes()[8:]),
            ("model-00002-of-00004.safetensors", "invalid header length"),
        ),
        (lambda p: p.write_bytes(p.read_bytes()[:8] + b"#" + p.read_bytes()[9:]), ("not valid JSON",)),
        (lambda p: p.write_bytes(p.read_bytes().replace(b'"BF16"', b'"BX16"', 1)), ("unknown dtype 'BX16'",)),
        (lambda p: p.write_bytes(p.read_bytes() + b"\x00" * 3), ("3 unexplained bytes",)),
    ],
)
def test_cli_rejects_a_broken_shard(model_copy: Path, tmp_path: Path, breakage, needles: tuple[str, ...]) -> None:  # type: ignore[no-untyped-def]
    breakage(model_copy / "model-00002-of-00004.safetensors")
    _expect_rejected(model_copy, tmp_path, *needles)


def test_cli_rejects_offsets_that_overlap_or_leave_holes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    write_raw_safetensors(
        src / "model.safetensors",
        {"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}, "b": {"dtype": "U8", "shape": [4], "data_offsets": [3, 7]}},
        b"1234567",
    )
    _expect_rejected(src, tmp_path, "tensor 'b' overlaps tensor 'a'")
    write_raw_safetensors(
        src / "model.safetensors",
        {"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}, "b": {"dtype": "U8", "shape": [2], "data_offsets": [3, 5]}},
        b"12345",
    )
    _expect_rejected(src, tmp_path, "hole of 1 bytes")


def test_cli_rejects_a_shape_that_does_not_match_its_bytes(tmp_path: Path) -> None:
    src = tmp_path / "bad.safetensors"
    write_raw_safetensors(src, {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"12345678")
    _expect_rejected(src, tmp_path, "F32 [3] needs 12 bytes")


def test_cli_rejects_the_same_tensor_in_two_shards(model_copy: Path, tmp_path: Path) -> None:
    (model_copy / INDEX_NAME).unlink()
    shutil.copy(model_copy / "model-00001-of-00004.safetensors", model_copy / "model-00009-of-00004.safetensors")
    _expect_rejected(model_copy, tmp_path, "is in both model-00001-of-00004.safetensors and model-00009")


def test_cli_rejects_an_index_naming_a_missing_file(model_copy: Path, tmp_path: Path) -> None:
    (model_copy / "model-00003-of-00004.safetensors").unlink()
    _expect_rejected(model_copy, tmp_path, "weight_map names 'model-00003-of-00004.safetensors', which is missing")


def test_cli_rejects_an_index_that_disagrees_with_the_shards(model_copy: Path, tmp_path: Path) -> None:
    index = json.loads((model_copy / INDEX_NAME).read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00004.safetensors"
    (model_copy / INDEX_NAME).write_text(json.dumps(index))
    _expect_rejected(model_copy, tmp_path, "index puts tensor 'model.norm.weight' in model-00001-of-00004")


def test_cli_names_a_tensor_larger_than_the_limit_and_suggests_a_size(tiny_model: Path, tmp_path: Path) -> None:
    _expect_rejected(
        tiny_model,
        tmp_path,
        "model.embed_tokens.weight",
        "does not fit in a shard of 100.00 kB",
        extra=("--max-shard-size", "100kB"),
    )
    proc = run_prewarm("reshard", tiny_model, tmp_path / "dst", "--max-shard-size", "100kB")
    assert "hint: use --max-shard-size 0.6MB or more" in proc.stderr
    run_prewarm("reshard", tiny_model, tmp_path / "dst", "--max-shard-size", "0.6MB", check=True)


def test_cli_refuses_an_existing_destination_and_leaves_it_alone(tiny_model: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "precious.txt").write_text("mine")
    proc = run_prewarm("reshard", tiny_model, dst)
    assert_clean_failure(proc, 4, "already exists")
    assert listing(dst) == ["precious.txt"]
    assert listing(tmp_path) == ["dst"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("/nonexistent/model", "X"), "/nonexistent/model: no such file or directory"),
        (("SRC", "X", "--max-shard-size", "5 parsecs"), "invalid size '5 parsecs'"),
        (("SRC", "/nonexistent/dir/out"), "parent directory does not exist"),
    ],
)
def test_cli_bad_arguments(tiny_model: Path, tmp_path: Path, args: tuple[str, ...], needle: str) -> None:
    args = tuple(str(tiny_model) if a == "SRC" else str(tmp_path / a) if a == "X" else a for a in args)
    proc = run_prewarm("reshard", *args)
    assert proc.returncode in (2, 3, 4)
    assert_clean_failure(proc, proc.returncode, needle)


def test_cli_rejects_a_directory_without_safetensors(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "pytorch_model.bin").write_bytes(b"pickle")
    _expect_rejected(src, tmp_path, "no .safetensors weight files found")


def test_pickles_and_unindexed_shards_are_not_copied(model_copy: Path, tmp_path: Path) -> None:
    (model_copy / "pytorch_model.bin").write_bytes(b"pickle")
    (model_copy / "consolidated.safetensors").write_bytes(b"not even read")
    (model_copy / ".hidden").write_text("x")
    (model_copy / "original").mkdir()
    result = reshard(model_copy, tmp_path / "dst")
    assert set(result.skipped_files) == {"pytorch_model.bin", "consolidated.safetensors", "original"}
    assert not {"pytorch_model.bin", "consolidated.safetensors", ".hidden"} & set(listing(tmp_path / "dst"))
    assert os.stat(tmp_path / "dst" / "config.json").st_size == os.stat(model_copy / "config.json").st_size
