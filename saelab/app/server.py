"""The local feature browser: a stdlib HTTP server over the feature indexes of a run folder.

    server = make_server("runs/feats", port=8000)     # binds 127.0.0.1 unless told otherwise
    server.serve_forever()

Pages are one static shell (static/app.html + app.js + app.css, no CDN) that
renders from the JSON API below; the README documents it.

    GET  /api/saes                                   SAEs found under the run folder
    GET  /api/saes/NAME                              one SAE: meta, summary, eval metrics
    GET  /api/saes/NAME/features?sort=&order=&offset=&limit=&alive=   feature list
    GET  /api/saes/NAME/features/ID                  one feature: stats, examples, lens, ...
    POST /api/saes/NAME/features/ID/ablation         live token ablation of the top example
    POST /api/saes/NAME/search   {"text"}            which features fire on which tokens
    POST /api/saes/NAME/steer    {"prompt", "feature", "mode", "strength", ...}

Only the SAEs discovered at start-up are served, by name: no URL is ever turned
into a file path (static files come from a fixed list), so there is no path
traversal. Parquet is read with pyarrow; torch and the model load on the first
live request. Bad input gets a 4xx with ``{"error": "..."}`` and the server
goes on.
"""

from __future__ import annotations

import errno
import json
import math
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pyarrow.compute as pc

from saelab.errors import SaelabError
from saelab.features.index import FeatureIndex, NotAnIndexError, find_indexes

STATIC = Path(__file__).parent / "static"
MAX_BODY = 64 * 1024
MAX_PROMPT_CHARS = 4000
MAX_TOKENS = 256
MAX_NEW_TOKENS = 128
SORTABLE = ("feature", "density", "max_act", "mean_act", "count", "label")
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8"}


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class App:
    """What the server serves: the indexes found at start-up, and the live model (lazily)."""

    def __init__(self, run_dir: str | Path, device: str = "cpu"):
        self.run_dir = Path(run_dir)
        if not self.run_dir.is_dir():
            raise SaelabError(f"{run_dir} does not exist or is not a folder; give the --out folder "
                              "of `saelab features`.")
        self.saes: dict[str, FeatureIndex] = {}
        for folder in find_indexes(self.run_dir):
            rel = folder.relative_to(self.run_dir).as_posix()
            name = rel if rel != "." else folder.resolve().name
            try:
                self.saes[name] = FeatureIndex.open(folder)
            except NotAnIndexError:
                continue
        if not self.saes:
            raise SaelabError(f"no feature index under {run_dir} (looked for index.json up to 3 "
                              "folders deep). Create one with `saelab features SAE_DIR --out DIR`, "
                              "then serve DIR.")
        self.device = device
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
        if name not in self.saes:
            raise HttpError(404, f"no SAE named {name!r} here; known: {', '.join(self.saes)}")
        return self.saes[name]

    def feature_id(self, index: FeatureIndex, text: str | int) -> int:
        try:
            f = int(text)
        except (TypeError, ValueError):
            raise HttpError(400, f"feature id {text!r} is not an integer") from None
        if not 0 <= f < index.d_sae:
            raise HttpError(404, f"feature {f} does not exist: this SAE has features 0..{index.d_sae - 1}")
        return f

    # ------------------------------------------------------------------ API
    def sae_summary(self, name: str, index: FeatureIndex) -> dict:
        meta = index.meta
        return {"name": name, "sae": meta["sae"], "model": meta["model"]["name"],
                "tokens": meta["tokens"], "summary": meta["summary"],
                "corpus": meta["collection"].get("corpus")}

    def sae_detail(self, name: str) -> dict:
        index = self.index(name)
        out = self.sae_summary(name, index)
        out["logit_lens"] = index.meta["logit_lens"]
        out["collection"] = index.meta["collection"]
        out["eval"] = _eval_metrics(index)
        return out

    def feature_list(self, name: str, query: dict[str, list[str]]) -> dict:
        index = self.index(name)
        sort = query.get("sort", ["feature"])[0]
        order = query.get("order", ["asc"])[0]
        if sort not in SORTABLE or order not in ("asc", "desc"):
            raise HttpError(400, f"sort must be one of {', '.join(SORTABLE)} and order asc|desc; "
                                 f"got sort={sort!r}, order={order!r}")
        offset, limit = _int_arg(query, "offset", 0, 0, 10**9), _int_arg(query, "limit", 100, 1, 1000)
        key = (name, sort, order)
        if key not in self._order:
            direction = "ascending" if order == "asc" else "descending"
            # nulls (mean_act of dead features, labels) sort last by default
            self._order[key] = pc.sort_indices(index.features, sort_keys=[(sort, direction)])
        rows = index.features.take(self._order[key])
        if query.get("alive", ["0"])[0] == "1":
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
        examples = index.examples(f)
        top = float(row["max_act"] or 0.0)
        n_bins = index.meta["collection"]["config"]["n_bins"]
        bins = [{"bin": b, "lo": b * top / n_bins, "hi": (b + 1) * top / n_bins,
                 "count": row["bin_counts"][b],
                 "examples": sorted((e for e in examples if e["kind"] == "bin" and e["bin"] == b),
                                    key=lambda e: -e["act"])}
                for b in range(n_bins - 1, -1, -1)]
        return _clean({"sae": name, **row, "top": [e for e in examples if e["kind"] == "top"],
                       "bins": bins, "ablation": index.ablation(f), "n_tokens": index.meta["tokens"],
                       "d_sae": index.d_sae})

    def live_ablation(self, name: str, fid: str) -> dict:
        index = self.index(name)
        f = self.feature_id(index, fid)
        top = [e for e in index.examples(f) if e["kind"] == "top"]
        if not top:
            raise HttpError(404, f"feature {f} never fired in the collected tokens: no example to ablate")
        context = index.feature(f).get("top_context")
        return _clean(self._call(lambda: self.live.ablation(name, index, f, top[0], context)))

    def search(self, name: str, body: dict) -> dict:
        index = self.index(name)
        text = body.get("text")
        if not isinstance(text, str) or not text.strip():
            raise HttpError(400, 'search needs {"text": "..."} with some text')
        if len(text) > MAX_PROMPT_CHARS:
            raise HttpError(413, f"the prompt has {len(text)} characters; at most {MAX_PROMPT_CHARS}")
        top = _body_int(body, "top", 5, 1, 20)
        return self._call(lambda: self.live.search(name, index, text, top=top, max_tokens=MAX_TOKENS))

    def steer(self, name: str, body: dict) -> dict:
        index = self.index(name)
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise HttpError(400, 'steer needs {"prompt": "...", "feature": ID}')
        if len(prompt) > MAX_PROMPT_CHARS:
            raise HttpError(413, f"the prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS}")
        f = self.feature_id(index, body.get("feature"))
        mode = body.get("mode", "add")
        if mode not in ("add", "clamp"):
            raise HttpError(400, f"mode must be 'add' or 'clamp', got {mode!r}")
        strength = body.get("strength", 0.25)  # site norms: saelab.interventions.strength
        if not isinstance(strength, int | float) or not math.isfinite(strength) or abs(strength) > 1000:
            raise HttpError(400, f"strength must be a number within ±1000, got {strength!r}")
        temperature = body.get("temperature", 0.7)
        if not isinstance(temperature, int | float) or not 0 <= temperature <= 2:
            raise HttpError(400, f"temperature must be a number in [0, 2], got {temperature!r}")
        args = dict(prompt=prompt, feature=f, mode=mode, strength=float(strength),
                    max_new_tokens=_body_int(body, "max_new_tokens", 40, 1, MAX_NEW_TOKENS),
                    seed=_body_int(body, "seed", 0, 0, 2**31 - 1),
                    temperature=float(temperature), chat=bool(body.get("chat", True)))
        return self._call(lambda: self.live.steer(name, index, **args))

    def _call(self, fn):
        from saelab.app.live import LiveError

        try:
            return fn()
        except LiveError as err:
            raise HttpError(err.status, str(err)) from None
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


def _int_arg(query: dict, key: str, default: int, lo: int, hi: int) -> int:
    raw = query.get(key, [str(default)])[0]
    try:
        value = int(raw)
    except ValueError:
        raise HttpError(400, f"{key} must be an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise HttpError(400, f"{key}={value} is out of range [{lo}, {hi}]")
    return value


def _body_int(body: dict, key: str, default: int, lo: int, hi: int) -> int:
    value = body.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise HttpError(400, f"{key} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


PAGES = ("", "sae")  # first path segment of the pages the shell renders


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"

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
            elif method == "GET" and parts[:1] == ["static"] and len(parts) == 2:
                self._static(parts[1])
            elif method == "GET" and (not parts or parts[0] in PAGES):
                self._static("app.html")
            else:
                raise HttpError(404, f"no page at {url.path}")
        except HttpError as err:
            self._json(err.status, {"error": str(err)})
        except Exception as err:  # keep serving whatever one request did
            self._json(500, {"error": f"internal error: {type(err).__name__}: {err}"})

    def _check_host(self) -> None:
        # A page on another site cannot reach a loopback-bound server through DNS rebinding.
        if self.server.loopback:
            host = (self.headers.get("Host") or "").rsplit(":", 1)[0]
            if host not in LOOPBACK:
                raise HttpError(403, f"host {host!r} refused: this server answers to localhost only")

    def _api(self, method: str, parts: list[str], query: dict) -> Any:
        app = self.server.app
        if method == "GET":
            if parts == ["saes"]:
                return [app.sae_summary(n, i) for n, i in app.saes.items()]
            if len(parts) == 2 and parts[0] == "saes":
                return app.sae_detail(parts[1])
            if len(parts) == 3 and parts[0] == "saes" and parts[2] == "features":
                return app.feature_list(parts[1], query)
            if len(parts) == 4 and parts[0] == "saes" and parts[2] == "features":
                return app.feature(parts[1], parts[3])
        elif method == "POST" and len(parts) >= 3 and parts[0] == "saes":
            body = self._body()
            if len(parts) == 3 and parts[2] == "search":
                return app.search(parts[1], body)
            if len(parts) == 3 and parts[2] == "steer":
                return app.steer(parts[1], body)
            if len(parts) == 5 and parts[2] == "features" and parts[4] == "ablation":
                return app.live_ablation(parts[1], parts[3])
        raise HttpError(404 if method == "GET" else 405 if not parts else 404,
                        f"no API endpoint {method} /api/{'/'.join(parts)}")

    def _body(self) -> dict:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise HttpError(400, "bad Content-Length") from None
        if length > MAX_BODY:
            raise HttpError(413, f"request body of {length} bytes; at most {MAX_BODY}")
        raw = self.rfile.read(length) if length else b"{}"
        try:
            body = json.loads(raw or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise HttpError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise HttpError(400, "the request body must be a JSON object")
        return body

    def _static(self, name: str) -> None:
        path = self.server.app.static.get(name)
        if path is None:
            raise HttpError(404, f"no static file {name!r}")
        self._send(200, path.read_bytes(), TYPES[path.suffix])

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
    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: App):
        self.app = app
        self.loopback = address[0] in LOOPBACK
        super().__init__(address, Handler)


def make_server(run_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000,
                device: str = "cpu") -> Server:
    """A server for `run_dir`, bound and ready for `serve_forever()`."""
    app = App(run_dir, device)
    try:
        return Server((host, port), app)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise SaelabError(f"port {port} on {host} is in use (another server?); pass "
                              "--port with another number, or --port 0 for any free port.") from None
        if err.errno in (errno.EADDRNOTAVAIL, errno.EACCES):
            raise SaelabError(f"cannot bind {host}:{port} ({err.strerror}); use --host 127.0.0.1 "
                              "and a port above 1023.") from None
        raise
