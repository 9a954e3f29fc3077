"""A real third-party web app for the end-to-end tests: FastAPI (Starlette) on uvicorn.

Run ``python tests/thirdparty_apps.py``: it binds 127.0.0.1:0 itself, prints
``listening port=N`` (the harness's readiness line) and serves on that socket with
``uvicorn.Server(config).serve(sockets=[sock])``, so no port is ever guessed.

Routes (all behaviour is FastAPI's / Starlette's / uvicorn's own, nothing hand-made):

``GET /items``          ``{"items": [...]}``; ``GET /items/`` gets Starlette's automatic
                        307 slash redirect, whose ``Location`` is built from the request's
                        ``Host`` (and scheme, from ``X-Forwarded-Proto`` via uvicorn).
``GET /links``          201 with ``Location``, ``Content-Location`` and ``Refresh`` URLs
                        built from the request's origin (``request.base_url``).
``GET /offsite``        302 to ``http://other.test:81/x`` (another origin).
``GET /headers``        the request headers as received, ``[[name, value], ...]``.
``GET /sse``            server-sent events: ``?n=5&interval=0.3``, event ``i`` is
                        ``id: i`` / ``data: {"i": i}``.
``POST /upload``        reads the body as a stream; ``{"len": N, "sha256": HEX}``.
``WS /ws``              accepts subprotocol ``chat`` when offered; echoes text and binary;
                        ``close`` -> closes with 4321 ``bye``; ``big:N`` -> sends a text
                        message of N ``y``; every close it sees is recorded under the
                        ``tag`` query parameter.
``WS /ws/moved``        refuses the upgrade with Starlette's denial response: a 307 to
                        ``/items`` on the request's origin (``http``/``https`` for ``ws``/``wss``).
``GET /ws/closes``      ``{tag: [code, reason, who]}`` (``who`` is ``peer`` when the other side
                        closed, ``app`` when the app did).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import sys
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import RedirectResponse, Response, StreamingResponse

#: uvicorn's own WebSocket message limit (default 16 MiB), raised for the big-message tests.
WS_MAX_SIZE = 64 * 1024 * 1024
CLOSE_CODE = 4321
CLOSE_REASON = "bye"

app = FastAPI()
closes: dict[str, tuple[int, str, str]] = {}


@app.get("/items")
async def items() -> dict[str, list[str]]:
    return {"items": ["a", "b"]}


@app.get("/links")
async def links(request: Request) -> Response:
    """201 with Location, Content-Location and Refresh built from the request's origin."""
    base = str(request.base_url).rstrip("/")
    headers = {
        "Location": f"{base}/items",
        "Content-Location": f"{base}/items?x=1",
        "Refresh": f"3; url={base}/items",
    }
    return Response(status_code=201, headers=headers)


@app.get("/offsite")
async def offsite() -> RedirectResponse:
    return RedirectResponse("http://other.test:81/x", status_code=302)


@app.get("/headers")
async def headers(request: Request) -> list[list[str]]:
    return [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.scope["headers"]]


@app.get("/sse")
async def sse(n: int = 5, interval: float = 0.3) -> StreamingResponse:
    async def events() -> AsyncIterator[bytes]:
        for i in range(n):
            if i:
                await asyncio.sleep(interval)
            yield f"id: {i}\ndata: {json.dumps({'i': i})}\n\n".encode()

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@app.post("/upload")
async def upload(request: Request) -> dict[str, int | str]:
    h = hashlib.sha256()
    n = 0
    async for chunk in request.stream():
        h.update(chunk)
        n += len(chunk)
    return {"len": n, "sha256": h.hexdigest()}


@app.websocket("/ws")
async def ws(websocket: WebSocket) -> None:
    tag = websocket.query_params.get("tag", "")
    offered = websocket.scope.get("subprotocols", [])
    await websocket.accept(subprotocol="chat" if "chat" in offered else None)
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                closes[tag] = (message.get("code", 1005), message.get("reason") or "", "peer")
                return
            text = message.get("text")
            if text == "close":
                closes[tag] = (CLOSE_CODE, CLOSE_REASON, "app")
                await websocket.close(code=CLOSE_CODE, reason=CLOSE_REASON)
                return
            if text is not None and text.startswith("big:"):
                await websocket.send_text("y" * int(text[4:]))
            elif text is not None:
                await websocket.send_text(text)
            else:
                await websocket.send_bytes(message.get("bytes") or b"")
    except WebSocketDisconnect as e:
        closes[tag] = (e.code, e.reason or "", "peer")


@app.websocket("/ws/moved")
async def ws_moved(websocket: WebSocket) -> None:
    base = str(websocket.base_url).replace("ws", "http", 1).rstrip("/")
    await websocket.send_denial_response(RedirectResponse(f"{base}/items", status_code=307))


@app.get("/ws/closes")
async def ws_closes() -> dict[str, tuple[int, str, str]]:
    return closes


def main() -> None:
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)  # connections wait in the backlog until uvicorn accepts them
    config = uvicorn.Config(
        app, log_level="info", lifespan="off", ws_max_size=WS_MAX_SIZE, timeout_keep_alive=30
    )
    print(f"listening port={sock.getsockname()[1]}", flush=True)
    sys.stdout.flush()
    asyncio.run(uvicorn.Server(config).serve(sockets=[sock]))


if __name__ == "__main__":
    main()
