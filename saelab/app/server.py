"""The local feature browser: a stdlib HTTP server over the feature indexes of a run folder.

    server = make_server("runs/feats", port=8000)     # binds 127.0.0.1 unless told otherwise
    server.serve_forever()

Pages are one static shell (static/app.html + app.js + app.css, no CDN) that
renders from the JSON API below; the README documents it.

    GET  /api/saes                                   SAEs found under the run folder
    GET  /api/damaged                                damaged indexes found there, by file
    GET  /api/saes/NAME                              one SAE: meta, summary, eval metrics
    GET  /api/saes/NAME/features?sort=&order=&offset=&limit=&alive=   feature list
    GET  /api/saes/NAME/features/ID                  one feature: stats, examples, lens, ...
    POST /api/saes/NAME/features/ID/ablation         live ablated text of the top and uniform examples
    POST /api/saes/NAME/search   {"text"}            which features fire on which tokens
    POST /api/saes/NAME/steer    {"prompt", "feature", "mode", "strength", ...}
    GET  /api/scope, POST /api/scope/search, /api/scope/steer   on a scope folder (scope_routes)

Only the SAEs discovered at start-up are served, by name: no URL is ever turned
into a file path (static files come from a fixed list), so there is no path
traversal. Parquet is read with pyarrow; torch and the model load on the first
live request. Bad input gets a 4xx with ``{"error": "..."}`` and the server
goes on; every field is type-checked in saelab.app.request. A damaged index is
named (file and rebuild command) with a 503, never skipped in silence. Each
connection has a read timeout and at most `max_connections` are served at once
(the next one gets a 503), so idle or slow clients cannot hold every thread.
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

import pyarrow as pa
import pyarrow.compute as pc

from saelab.app.indexes import Damaged, open_indexes, read_failed
from saelab.app.request import (
    HttpError,
    bool_field,
    check_keys,
    check_query,
    choice_field,
    int_field,
    number_field,
    path_int,
    query_choice,
    query_int,
    read_json_body,
    text_field,
)
from saelab.app.scope_routes import ScopeRoutes
from saelab.errors import CorruptFileError, SaelabError
from saelab.features.index import ABLATION, EXAMPLES, FeatureIndex, lens_filter
from saelab.scope.layout import is_scope

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
READ_TIMEOUT = 30.0  # seconds a connection may stay silent (idle keep-alive, a stalled body)
MAX_CONNECTIONS = 32  # connections served at once; a browser opens about 6
MAX_PROMPT_CHARS = 4000
MAX_TOKENS = 256
MAX_NEW_TOKENS = 128
SORTABLE = ("feature", "density", "max_act", "mean_act", "count", "label")
STEER_FIELDS = ("prompt", "feature", "mode", "strength", "max_new_tokens", "seed", "temperature",
                "chat")
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8"}


class App:
    """What the server serves: the indexes found at start-up, and the live model (lazily)."""

    def __init__(self, run_dir: str | Path, device: str = "cpu"):
        self.run_dir = Path(run_dir)
        if not self.run_dir.is_dir():
            raise SaelabError(f"{run_dir} does not exist or is not a folder; give the --out folder "
                              "of `saelab features`.")
        self.saes, self.damaged = open_indexes(self.run_dir)
        self.device = device
        self.scope = ScopeRoutes(self.run_dir, self) if is_scope(self.run_dir) else None
        damaged = list(self.damaged.values())
        if not self.saes and damaged and self.scope is None:  # nothing to serve: name the first
            for d in damaged[1:]:
                log.warning("%s", d.message)
            more = f" ({len(damaged) - 1} more damaged index(es) logged above)" if len(damaged) > 1 else ""
            raise CorruptFileError(damaged[0].message + more)
        for d in damaged:  # served anyway: each is named in the log, on / and on its pages
            log.warning("%s", d.message)
        from saelab.app.graphs import find_graphs

        self.graphs = find_graphs(self.run_dir)  # attribution graphs (saelab graph --out)
        if not self.saes and self.scope is None and not self.graphs:
            raise SaelabError(f"no feature index under {run_dir} (looked for index.json up to 3 "
                              "folders deep). Create one with `saelab features SAE_DIR --out DIR`, "
                              "then serve DIR.")
        self._live = None
        self._live_lock = threading.Lock()
        self._order: dict[tuple[str, str, str], Any] = {}
        self.static = {p.name: p for p in STATIC.iterdir() if p.suffix in TYPES}

    @property
    def live(self):
        with self._live_lock:
            if self._live is None:
                from saelab.app.live import Live  # torch is imported here, not at start-up

                self._live = Live(self.device)
            return self._live

    # ------------------------------------------------------------------ lookups
    def index(self, name: str) -> FeatureIndex:
        if name in self.damaged:
            raise HttpError(503, self.damaged[name].message)
        if name not in self.saes:
            raise HttpError(404, f"no SAE named {name[:80]!r} here; known: {', '.join(self.saes)}")
        return self.saes[name]

    def feature_id(self, index: FeatureIndex, f: int | str) -> int:
        """A feature id of `index` from a URL segment (str) or a type-checked body field (int)."""
        if isinstance(f, str):
            f = path_int(f, "feature id")
        if not 0 <= f < index.d_sae:
            raise HttpError(404, f"feature {f} does not exist: this SAE has features 0..{index.d_sae - 1}")
        return f

    def examples(self, name: str, index: FeatureIndex, f: int) -> list[dict]:
        try:
            return index.examples(f)
        except (OSError, pa.ArrowException) as err:  # a page damaged inside: name the file
            raise HttpError(503, read_failed(name, index, EXAMPLES, err).message) from None

    def stored_ablation(self, name: str, index: FeatureIndex, f: int) -> list[dict]:
        try:
            return index.ablations(f)
        except (OSError, pa.ArrowException) as err:
            raise HttpError(503, read_failed(name, index, ABLATION, err).message) from None

    # ------------------------------------------------------------------ API
    def sae_summary(self, name: str, index: FeatureIndex) -> dict:
        meta = index.meta
        return {"name": name, "sae": meta["sae"], "model": meta["model"]["name"],
                "tokens": meta["tokens"], "summary": meta["summary"],
                "corpus": meta["collection"].get("corpus")}

    def sae_detail(self, name: str) -> dict:
        index = self.index(name)
        out = self.sae_summary(name, index)
        out["logit_lens"] = index.meta["logit_lens"] | {"filter": lens_filter(index.meta)}
        out["collection"] = index.meta["collection"]
        out["eval"] = _eval_metrics(index)
        return out

    def damaged_list(self) -> list[dict]:
        return [{"name": d.name, "file": str(d.file), "problem": d.problem, "message": d.message}
                for d in self.damaged.values()]

    def feature_list(self, name: str, query: dict[str, list[str]]) -> dict:
        index = self.index(name)
        check_query(query, ("sort", "order", "offset", "limit", "alive"), "the feature list")
        sort = query_choice(query, "sort", "feature", SORTABLE)
        order = query_choice(query, "order", "asc", ("asc", "desc"))
        alive = query_choice(query, "alive", "0", ("0", "1")) == "1"
        offset = query_int(query, "offset", 0, 0, 10**9)
        limit = query_int(query, "limit", 100, 1, 1000)
        key = (name, sort, order)
        if key not in self._order:
            direction = "ascending" if order == "asc" else "descending"
            # nulls (mean_act of dead features, labels) sort last by default
            self._order[key] = pc.sort_indices(index.features, sort_keys=[(sort, direction)])
        rows = index.features.take(self._order[key])
        if alive:
            rows = rows.filter(pc.greater(rows["count"], 0))
        page = rows.slice(offset, limit).select(
            ["feature", "density", "max_act", "mean_act", "count", "label", "lens_top_tokens"])
        items = page.to_pylist()
        for item in items:
            item["lens_top_tokens"] = (item["lens_top_tokens"] or [])[:5]
        return {"total": rows.num_rows, "offset": offset, "features": _clean(items)}

    def feature(self, name: str, fid: str) -> dict:
        index = self.index(name)
        f = self.feature_id(index, fid)
        row = index.feature(f)
        examples = self.examples(name, index, f)
        top = float(row["max_act"] or 0.0)
        n_bins = index.meta["collection"]["config"]["n_bins"]
        bins = [{"bin": b, "lo": b * top / n_bins, "hi": (b + 1) * top / n_bins,
                 "count": row["bin_counts"][b],
                 "examples": sorted((e for e in examples if e["kind"] == "bin" and e["bin"] == b),
                                    key=lambda e: -e["act"])}
                for b in range(n_bins - 1, -1, -1)]
        ablated = self.stored_ablation(name, index, f)
        uniform = sorted((r for r in ablated if r["kind"] == "bin"), key=lambda r: (-r["bin"], r["rank"]))
        return _clean({"sae": name, **row, "top": [e for e in examples if e["kind"] == "top"],
                       "bins": bins, "ablation": next((r for r in ablated if r["kind"] == "top"), None),
                       "ablation_uniform": uniform, "lens_filter": lens_filter(index.meta),
                       "n_tokens": index.meta["tokens"], "d_sae": index.d_sae})

    def live_ablation(self, name: str, fid: str, body: dict) -> dict:
        index = self.index(name)
        check_keys(body, (), "live ablation")
        f = self.feature_id(index, fid)
        examples = self.examples(name, index, f)
        top = [e for e in examples if e["kind"] == "top"][:1]
        if not top:
            raise HttpError(404, f"feature {f} never fired in the collected tokens: no example to ablate")
        per_bin = index.meta.get("ablation", {}).get("per_bin", 1)
        uniform = sorted((e for e in examples if e["kind"] == "bin" and e["rank"] < per_bin),
                         key=lambda e: (-e["bin"], e["rank"]))
        context = index.feature(f).get("top_context")
        rows = self._call(lambda: self.live.ablation(name, index, f, top + uniform, context))
        return _clean({"ablation": rows[0], "ablation_uniform": rows[1:], "live": True})

    def search(self, name: str, body: dict) -> dict:
        index = self.index(name)
        check_keys(body, ("text", "top"), "search")
        text = text_field(body, "text", MAX_PROMPT_CHARS)
        top = int_field(body, "top", 5, 1, 20)
        return self._call(lambda: self.live.search(name, index, text, top=top, max_tokens=MAX_TOKENS))

    def steer(self, name: str, body: dict) -> dict:
        index = self.index(name)
        check_keys(body, STEER_FIELDS, "steer")
        args = dict(prompt=text_field(body, "prompt", MAX_PROMPT_CHARS),
                    feature=self.feature_id(index, int_field(body, "feature", None, 0, 2**62)),
                    mode=choice_field(body, "mode", "add", ("add", "clamp")),
                    strength=number_field(body, "strength", 0.25, -1000.0, 1000.0),  # site norms
                    max_new_tokens=int_field(body, "max_new_tokens", 40, 1, MAX_NEW_TOKENS),
                    seed=int_field(body, "seed", 0, 0, 2**31 - 1),
                    temperature=number_field(body, "temperature", 0.7, 0.0, 2.0),
                    chat=bool_field(body, "chat", True))
        return self._call(lambda: self.live.steer(name, index, **args))

    def _call(self, fn):
        from saelab.app.live import LiveError

        try:
            return fn()
        except LiveError as err:
            raise HttpError(err.status, str(err)) from None
        except SaelabError as err:  # a damaged SAE file (503, logged) or another user error (409)
            if err.exit_code == CorruptFileError.exit_code:
                log.warning("live request: %s", err)
                raise HttpError(503, str(err)) from None
            raise HttpError(409, str(err)) from None
        except ValueError as err:
            raise HttpError(400, str(err)) from None


def _eval_metrics(index: FeatureIndex) -> dict | None:
    """`saelab eval`'s metrics when the SAE folder has an eval/eval.json next to it."""
    path = index.meta["sae"].get("path")
    if not path:
        return None
    candidate = Path(path) / "eval" / "eval.json"
    try:
        return json.loads(candidate.read_text()).get("metrics") if candidate.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def _clean(obj: Any) -> Any:
    """NaN/inf (not JSON) become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


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
                self._json(200, self._api(method, parts[1:], parse_qs(url.query)))
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

    def _api(self, method: str, parts: list[str], query: dict) -> Any:
        app = self.server.app
        if parts[:1] == ["scope"] and app.scope is not None:
            return app.scope.api(method, parts[1:], query, self._body)
        if parts[:1] == ["graphs"]:
            from saelab.app.graphs import graph_api

            if method == "GET":
                check_query(query, (), "GET /api/graphs")
            return graph_api(app.graphs, app.saes, method, parts[1:], self._body)
        if method == "GET":
            if len(parts) != 3:  # only the feature list takes query parameters
                check_query(query, (), f"GET /api/{'/'.join(parts)[:200]}")
            if parts == ["saes"]:
                return [app.sae_summary(n, i) for n, i in app.saes.items()]
            if parts == ["damaged"]:
                return app.damaged_list()
            if len(parts) == 2 and parts[0] == "saes":
                return app.sae_detail(parts[1])
            if len(parts) == 3 and parts[0] == "saes" and parts[2] == "features":
                return app.feature_list(parts[1], query)
            if len(parts) == 4 and parts[0] == "saes" and parts[2] == "features":
                return app.feature(parts[1], parts[3])
        elif method == "POST" and len(parts) >= 3 and parts[0] == "saes":
            if len(parts) == 3 and parts[2] == "search":
                return app.search(parts[1], self._body())
            if len(parts) == 3 and parts[2] == "steer":
                return app.steer(parts[1], self._body())
            if len(parts) == 5 and parts[2] == "features" and parts[4] == "ablation":
                return app.live_ablation(parts[1], parts[3], self._body())
        raise HttpError(404, f"no API endpoint {method} /api/{'/'.join(parts)[:200]}")

    def _body(self) -> dict:
        return read_json_body(self.headers, self.rfile)

    def _static(self, name: str) -> None:
        path = self.server.app.static.get(name)
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
