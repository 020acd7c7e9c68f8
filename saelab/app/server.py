"""The local feature browser: a stdlib HTTP server over the feature indexes of a run folder.

    server = make_server("runs/feats", port=8000)     # binds 127.0.0.1 unless told otherwise
    server.serve_forever()

Pages are one static shell (static/app.html + app.js + app.css, no CDN) that
renders from the JSON API; the routes and what each answers are in
saelab.app.routes (App), and the README documents them. This module is the HTTP
side: URLs to pages, static files and /api/ calls, host checks, JSON encoding,
connection limits.

No URL is ever turned into a file path (static files come from a fixed list),
so there is no path traversal. Bad input gets a 4xx with ``{"error": "..."}``
and the server goes on. A damaged index's page is served without the API (503,
file and rebuild command). Each connection has a read timeout and at most
`max_connections` are served at once (the next one gets a 503), so idle or slow
clients cannot hold every thread. A server bound to loopback answers only Host
headers naming this machine (no DNS rebinding).
"""

from __future__ import annotations

import errno
import html
import ipaddress
import json
import logging
import math
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from saelab.app.indexes import Damaged
from saelab.app.request import HttpError, read_json_body
from saelab.app.routes import App
from saelab.errors import SaelabError

__all__ = ["App", "Handler", "Server", "is_loopback", "make_server"]  # App (routes) re-exported

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
READ_TIMEOUT = 30.0  # seconds a connection may stay silent (idle keep-alive, a stalled body)
MAX_CONNECTIONS = 32  # connections served at once; a browser opens about 6
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8"}


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, brackets allowed) names this machine only."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """The host part of a Host header: "[::1]:8000" -> "[::1]", "localhost:80" -> "localhost"."""
    if header.startswith("["):
        return header.split("]", 1)[0] + "]"
    return header.rsplit(":", 1)[0]


PAGES = ("", "sae", "scope")  # first path segment of the pages the shell renders


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        # Every read and write on this connection gives up after the server's read timeout:
        # an idle keep-alive connection or a body that stops arriving frees its thread.
        self.timeout = self.server.read_timeout
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # quiet: the library never prints; errors reach the client as JSON

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        try:
            self._check_host()
            url = urlsplit(self.path)
            parts = [unquote(p) for p in url.path.split("/")[1:] if p != ""]
            if parts[:1] == ["api"]:
                self._json(200, self.server.app.api(method, parts[1:], parse_qs(url.query),
                                                    self._body))
            elif method == "GET" and parts[:1] == ["graph"]:
                self._static("graph.html")
            elif method == "GET" and parts[:1] == ["static"] and len(parts) == 2:
                self._static(parts[1])
            elif method == "GET" and (not parts or parts[0] in PAGES):
                if parts[:1] == ["sae"] and len(parts) > 1 and parts[1] in self.server.app.damaged:
                    self._damaged_page(self.server.app.damaged[parts[1]])
                else:
                    self._static("app.html")
            else:
                raise HttpError(404, f"no page at {url.path[:200]}")
        except HttpError as err:
            self._json(err.status, {"error": str(err)})
        except TimeoutError:  # the client stopped reading our answer: nothing more to say
            self.close_connection = True
        except Exception as err:  # keep serving whatever one request did
            log.exception("internal error on %s %s", method, self.path[:200])
            self._json(500, {"error": f"internal error: {type(err).__name__}: {err}"})

    def _check_host(self) -> None:
        # A page on another site cannot reach a loopback-bound server through DNS rebinding.
        if self.server.loopback:
            host = _host_name(self.headers.get("Host") or "")
            if not is_loopback(host):
                raise HttpError(403, f"host {host[:80]!r} refused: this server answers to localhost only")

    def _body(self) -> dict:
        return read_json_body(self.headers, self.rfile)

    def _static(self, name: str) -> None:
        path = self.server.static.get(name)
        if path is None:
            raise HttpError(404, f"no static file {name[:80]!r}")
        self._send(200, path.read_bytes(), TYPES[path.suffix])

    def _damaged_page(self, damaged: Damaged) -> None:
        """A page that works without the API: which file is damaged and how to rebuild it."""
        text = html.escape(damaged.message)
        page = (f"<!doctype html><meta charset=utf-8><title>damaged index</title>"
                f"<h1>Damaged feature index</h1><p id=error>{text}</p><p><a href=/>all SAEs</a></p>")
        self._send(503, page.encode(), TYPES[".html"])

    def _json(self, status: int, payload: Any) -> None:
        self._send(status, json.dumps(payload, allow_nan=False).encode(), "application/json")

    def _send(self, status: int, data: bytes, ctype: str) -> None:
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        # Only our own script may run, so even text that slipped through escaping stays inert.
        self.send_header("Content-Security-Policy", "default-src 'self'; img-src 'self' data:")
        self.send_header("X-Content-Type-Options", "nosniff")
        if status >= 400:  # the request body may be unread: do not reuse the connection
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)


class Server(ThreadingHTTPServer):
    """A threading HTTP server with a read timeout per connection and a bound on connections.

    read_timeout: seconds a socket read or write may wait (idle keep-alive connections,
    stalled bodies and clients that stop reading are dropped after it). max_connections:
    connections served at once; one more is answered 503 at once and closed.
    """

    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: App, *, read_timeout: float = READ_TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS):
        if not read_timeout > 0 or not math.isfinite(read_timeout):
            raise SaelabError(f"read_timeout must be a positive number of seconds, got {read_timeout!r}")
        if max_connections < 1:
            raise SaelabError(f"max_connections must be at least 1, got {max_connections!r}")
        self.app = app
        self.loopback = is_loopback(address[0])
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self.static = {p.name: p for p in STATIC.iterdir() if p.suffix in TYPES}
        super().__init__(address, Handler)

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        # Runs on the accepting thread: refusing here never blocks the accept loop on a slot.
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, request: socket.socket) -> None:
        body = json.dumps({"error": f"the server is busy: {self.max_connections} connections "
                                    "are open; retry in a moment"}).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")
        try:
            request.settimeout(1.0)  # a fresh socket's send buffer takes this at once
            request.sendall(head.encode() + body)
        except OSError:
            pass
        self.shutdown_request(request)


def make_server(run_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000,
                device: str = "cpu", read_timeout: float = READ_TIMEOUT,
                max_connections: int = MAX_CONNECTIONS) -> Server:
    """A server for `run_dir`, bound and ready for `serve_forever()`.

    Logs a warning when `host` is not a loopback address (the browser, its
    indexes and the live model are then reachable from the network), and one
    per damaged index. Raises SaelabError (no index, port in use, bad address),
    CorruptFileError (every index damaged).
    """
    app = App(run_dir, device)
    if not is_loopback(host):
        log.warning("serving on %s: the browser is reachable from the network, with no login; "
                    "anyone who can reach this port can read the feature indexes and run the "
                    "model. Use --host 127.0.0.1 to keep it on this machine.", host)
    try:
        return Server((host, port), app, read_timeout=read_timeout, max_connections=max_connections)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise SaelabError(f"port {port} on {host} is in use (another server?); pass "
                              "--port with another number, or --port 0 for any free port.") from None
        if err.errno in (errno.EADDRNOTAVAIL, errno.EACCES):
            raise SaelabError(f"cannot bind {host}:{port} ({err.strerror}); use --host 127.0.0.1 "
                              "and a port above 1023.") from None
        raise
