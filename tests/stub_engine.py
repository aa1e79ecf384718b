#!/usr/bin/env python3
"""A stand-in for vLLM's OpenAI server, for the chat page's tests: the daemon runs it as its engine
(``PREWARM_ENGINE_PYTHON=/abs/path/tests/stub_engine.py``) with vLLM's command line,
``-m vllm.entrypoints.openai.api_server --model DIR --uds SOCK --served-model-name NAME ...``.

It serves a real HTTP server (aiohttp) on the Unix socket SOCK: ``/health``, ``/v1/models`` (with
``max_model_len``), the daemon's non-streaming one-token warm-up on ``/v1/completions``, and a
streamed ``/v1/chat/completions`` whose answer is what a random-weight model cannot be made to
say: markup that must show as text, and non-Latin text sent in raw byte pieces, one of them cut
inside a multi-byte UTF-8 character. aiohttp must be importable by the ``python3`` on PATH.
SIGTERM stops it (aiohttp's run_app turns it into a clean exit). With ``STUB_ENGINE_FAIL=TEXT`` in
its environment it prints ``RuntimeError: TEXT`` and exits 1 at once, as an engine that cannot
start does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

from aiohttp import web

MARKUP = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'
NON_LATIN = "日本語 Ελληνικά"
PIECES = ("Markup, as text: ", MARKUP, " and ", NON_LATIN, " — done.")
ANSWER = "".join(PIECES)
PIECE_DELAY_S = 0.15  # apart, so that the page sees the answer grow


def _chunk(name: str, delta: dict[str, str], finish: str | None, usage: dict[str, int] | None) -> bytes:
    body: dict[str, Any] = {
        "id": "chatcmpl-stub",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": name,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if usage is not None:
        body["usage"] = usage
    return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"


def answer_bytes(name: str, usage_every_piece: bool, include_usage: bool, prompt_tokens: int) -> list[bytes]:
    """The SSE stream as the writes that send it: one event per write, except the event with the
    non-Latin text, which is cut after the first byte of its first character."""
    def usage(n: int) -> dict[str, int]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}

    events = [_chunk(name, {"role": "assistant", "content": ""}, None, usage(0) if usage_every_piece else None)]
    for n, piece in enumerate(PIECES, 1):
        last = n == len(PIECES)
        events.append(_chunk(name, {"content": piece}, "stop" if last else None, usage(n) if usage_every_piece else None))
    writes: list[bytes] = []
    for event in events:
        at = event.find(NON_LATIN.encode())
        writes += [event[: at + 1], event[at + 1 :]] if at >= 0 else [event]
    if include_usage:
        writes.append(b"data: " + json.dumps({"id": "chatcmpl-stub", "object": "chat.completion.chunk", "choices": [],
                                              "usage": usage(len(PIECES))}).encode() + b"\n\n")
    writes.append(b"data: [DONE]\n\n")
    return writes


def make_app(name: str, model_dir: str, max_model_len: int) -> web.Application:
    async def health(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(request: web.Request) -> web.Response:
        card = {"id": name, "object": "model", "created": int(time.time()), "owned_by": "stub", "root": model_dir,
                "parent": None, "max_model_len": max_model_len, "permission": []}
        return web.json_response({"object": "list", "data": [card]})

    async def completions(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({
            "id": "cmpl-stub", "object": "text_completion", "created": int(time.time()), "model": name,
            "choices": [{"index": 0, "text": " hi", "logprobs": None, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": int(body.get("max_tokens") or 1), "total_tokens": 2},
        })

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages") or ())
        if not body.get("stream"):
            return web.json_response({
                "id": "chatcmpl-stub", "object": "chat.completion", "created": int(time.time()), "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(PIECES),
                          "total_tokens": prompt_tokens + len(PIECES)},
            })
        options = body.get("stream_options") or {}
        writes = answer_bytes(name, bool(options.get("continuous_usage_stats")), bool(options.get("include_usage")),
                              prompt_tokens)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        for piece in writes:
            await response.write(piece)
            await asyncio.sleep(PIECE_DELAY_S)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat)
    return app


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-m", dest="module")
    parser.add_argument("--model", required=True)
    parser.add_argument("--uds", required=True)
    parser.add_argument("--served-model-name", required=True)
    parser.add_argument("--max-model-len", type=int, default=2048)
    args, _ignored = parser.parse_known_args(argv)  # the rest of vLLM's options mean nothing here
    if os.environ.get("STUB_ENGINE_FAIL"):
        print(f"RuntimeError: {os.environ['STUB_ENGINE_FAIL']}", flush=True)
        sys.exit(1)
    print(f"stub engine: serving {args.served_model_name} on {args.uds}", flush=True)
    web.run_app(make_app(args.served_model_name, args.model, args.max_model_len), path=args.uds, print=None)
    print("stub engine: stopped", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
