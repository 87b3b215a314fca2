"""A loopback stand-in for the Gemini REST API (``POST /v1beta/models/<model>:generateContent``), for tests.

Replies are scripted: each request takes the next ``(status, body)`` from ``replies``. Requests are recorded
(path, headers, JSON body) so tests can check what the real ``google-genai`` client sent.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def text_reply(text: str) -> tuple[int, dict[str, Any]]:
    """A successful generateContent answer holding ``text``."""
    return 200, {
        "candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP"}],
        "modelVersion": "gemini-test",
    }


def error_reply(status: int, message: str) -> tuple[int, dict[str, Any]]:
    """A Google API error body, as the real endpoint sends for 4xx/5xx."""
    names = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}
    return status, {"error": {"code": status, "message": message, "status": names.get(status, "UNKNOWN")}}


class GeminiServer:
    """``with GeminiServer([...]) as server: ... server.url ...``; ``server.requests`` lists what arrived."""

    def __init__(self, replies: list[tuple[int, dict[str, Any]]]) -> None:
        self.replies = deque(replies)
        self.requests: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.requests.append({"path": self.path, "headers": dict(self.headers), "json": json.loads(body)})
                status, payload = outer.replies.popleft() if outer.replies else error_reply(500, "script ran out")
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> GeminiServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()
