"""Checkpoints made on the spot, for tests, benchmarks and the demo (no hub needed).

- ``write_qwen25_7b_like``: Qwen2.5-7B's real tensor names, shapes and dtype with random
  bytes, written as transformers shards it (sorted names, 4 shards); ``scale`` shrinks it.
- ``build_tiny_qwen2``: a genuine Qwen2 model (transformers, random weights) with a trained
  byte-level BPE tokenizer and chat template, loadable by transformers and vLLM.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from prewarm.safetensors import encode_header, header_entry

QWEN25_7B = {"vocab": 152064, "hidden": 3584, "intermediate": 18944, "layers": 28, "heads": 28, "kv_heads": 4}
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen25_7b_config(scale: float = 1.0) -> dict[str, object]:
    """A Qwen2 config.json with 7B's shapes; ``scale`` < 1 shrinks layers, vocab and MLP width."""
    q = QWEN25_7B
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "torch_dtype": "bfloat16",
        "hidden_size": q["hidden"],
        "num_attention_heads": q["heads"],
        "num_key_value_heads": q["kv_heads"],
        "num_hidden_layers": max(1, round(q["layers"] * scale)),
        "intermediate_size": max(128, round(q["intermediate"] * scale / 128) * 128),
        "vocab_size": max(1024, round(q["vocab"] * scale / 128) * 128),
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "use_sliding_window": False,
    }


def qwen25_7b_tensors(config: dict[str, object]) -> list[tuple[str, list[int]]]:
    """(name, shape) of every tensor of a Qwen2 model with this config, in model order."""
    hidden, inter, vocab = (int(config[k]) for k in ("hidden_size", "intermediate_size", "vocab_size"))  # type: ignore[call-overload]
    kv = int(config["num_key_value_heads"]) * hidden // int(config["num_attention_heads"])  # type: ignore[call-overload]
    tensors = [("model.embed_tokens.weight", [vocab, hidden])]
    for i in range(int(config["num_hidden_layers"])):  # type: ignore[call-overload]
        p = f"model.layers.{i}."
        tensors += [
            (p + "input_layernorm.weight", [hidden]),
            (p + "self_attn.q_proj.weight", [hidden, hidden]),
            (p + "self_attn.q_proj.bias", [hidden]),
            (p + "self_attn.k_proj.weight", [kv, hidden]),
            (p + "self_attn.k_proj.bias", [kv]),
            (p + "self_attn.v_proj.weight", [kv, hidden]),
            (p + "self_attn.v_proj.bias", [kv]),
            (p + "self_attn.o_proj.weight", [hidden, hidden]),
            (p + "post_attention_layernorm.weight", [hidden]),
            (p + "mlp.gate_proj.weight", [inter, hidden]),
            (p + "mlp.up_proj.weight", [inter, hidden]),
            (p + "mlp.down_proj.weight", [hidden, inter]),
        ]
    tensors += [("model.norm.weight", [hidden]), ("lm_head.weight", [vocab, hidden])]
    return tensors


def write_qwen25_7b_like(directory: Path, scale: float = 1.0, shards: int = 4) -> int:
    """Write the synthetic checkpoint; return its tensor bytes. Random data, BF16."""
    directory.mkdir(parents=True, exist_ok=True)
    config = qwen25_7b_config(scale)
    tensors = sorted(qwen25_7b_tensors(config))
    sizes = [2 * _numel(shape) for _, shape in tensors]
    total = sum(sizes)
    groups: list[list[int]] = [[] for _ in range(shards)]
    filled = 0
    for i, size in enumerate(sizes):
        groups[min(shards - 1, filled * shards // total)].append(i)
        filled += size
    weight_map = {}
    for g, members in enumerate(groups):
        name = f"model-{g + 1:05d}-of-{shards:05d}.safetensors"
        _write_random_shard(directory / name, [tensors[i] for i in members])
        weight_map.update({tensors[i][0]: name for i in members})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return total


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _write_random_shard(path: Path, tensors: list[tuple[str, list[int]]]) -> None:
    members, cursor = [b'"__metadata__":{"format":"pt"}'], 0
    for name, shape in tensors:
        nbytes = 2 * _numel(shape)
        members.append(header_entry(name, "BF16", shape, cursor, cursor + nbytes))
        cursor += nbytes
    block = os.urandom(64 * 2**20)
    with open(path, "wb") as f:
        f.write(encode_header(members))
        while cursor > 0:
            n = min(cursor, len(block))
            f.write(block[:n])
            cursor -= n


def build_tiny_qwen2(directory: Path, max_shard_size: str = "1MB", seed: int = 0) -> Path:
    """Save a real (random-weight) Qwen2 causal LM with tokenizer; needs torch and transformers."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        hidden_size=256,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=512,
        num_hidden_layers=2,
        vocab_size=1024,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)  # type: ignore[arg-type,no-untyped-call,unused-ignore]
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024 - len(specials), special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [
        "The quick brown fox jumps over the lazy dog.",
        "prewarm keeps the model hot.",
        "Hello, world! How are you today?",
    ] * 50
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return directory
