"""Host allow-list, access token (with throttled guessing), cross-site request protection and headers."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from urllib.parse import urlencode, urlsplit

from flask import Flask, Response, current_app, jsonify, make_response, redirect, render_template, request

from .config import AppConfig, is_loopback, normalize_host_name

COOKIE = "poseloop_token"
TOKEN_HEADER = "X-Poseloop-Token"
UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
# Reachable without the token: the login page needs its stylesheet.
PUBLIC_PREFIXES = ("/static/",)

CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


def _digest(token: str) -> str:
    # The cookie carries a digest so the raw token is not stored in every browser profile.
    return hashlib.sha256(("poseloop:" + token).encode()).hexdigest()


def _token_check(expected: str) -> bool | None:
    """None when the request carries no credential; else whether its header token or cookie is right."""
    auth = request.headers.get("Authorization", "")
    given = request.headers.get(TOKEN_HEADER) or (auth[7:] if auth.startswith("Bearer ") else None)
    if given is not None:
        return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode())
    cookie = request.cookies.get(COOKIE)
    if cookie is None:
        return None
    return hmac.compare_digest(cookie.encode("utf-8", "replace"), _digest(expected).encode())


def _error(status: int, message: str) -> Response:
    resp = jsonify(error=message)
    resp.status_code = status
    return resp


# ---------------------------------------------------------------- Host allow-list (DNS rebinding)


def request_host_name(host: str) -> str:
    """The name part of a Host header ("Name:8765" -> "name", "[::1]:80" -> "::1")."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def host_allowed(name: str, cfg: AppConfig) -> bool:
    """Whether a browser that reached this app as `name` may use it.

    A page on attacker.example can rebind that name to 127.0.0.1 and then talk to this app as "same
    origin"; the Host header still says attacker.example, so only names the operator chose pass. An IP
    address cannot be rebound (the page's origin is then this machine itself), so with a token any IP
    address is accepted, which keeps http://<LAN address>:8765 working without a flag.
    """
    if is_loopback(name):
        return True
    if not cfg.token:
        return False
    if name in cfg.allowed_hosts or name == normalize_host_name(cfg.host):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _host_refused(name: str, cfg: AppConfig) -> Response:
    if cfg.token:
        hint = f"start the app with --allowed_hosts {name} (space-separated for several names)"
    else:
        hint = (f"open it as http://127.0.0.1:{cfg.port}/ or http://localhost:{cfg.port}/, or share it with "
                f"--token SECRET --allowed_hosts {name}")
    return _error(421, f"Host {name!r} is not one of this app's names (a guard against DNS rebinding); {hint}")


# ---------------------------------------------------------------- throttling token guesses


class GuessThrottle:
    """Per client address: a few free wrong tokens, then a lock that doubles with every further failure.

    A locked address gets 429 at once, without its token being checked, so guessing costs the attacker
    time while no worker thread sleeps. Entries are forgotten after `forget_s` without a failure, and the
    table keeps at most `max_clients` addresses (oldest dropped), so a flood of addresses cannot grow it.
    """

    def __init__(self, free: int = 5, base_s: float = 1.0, cap_s: float = 900.0, forget_s: float = 3600.0,
                 max_clients: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.free, self.base_s, self.cap_s, self.forget_s = free, base_s, cap_s, forget_s
        self.max_clients, self.clock = max_clients, clock
        self._lock = threading.Lock()
        self._clients: OrderedDict[str, tuple[int, float, float]] = OrderedDict()  # failures, locked until, last

    def retry_after(self, client: str) -> float:
        """Seconds until `client` may try a token again (0 when it may now)."""
        with self._lock:
            entry = self._clients.get(client)
            return max(0.0, entry[1] - self.clock()) if entry else 0.0

    def failed(self, client: str) -> float:
        """Record a wrong token from `client`; returns the lock it now has, in seconds."""
        now = self.clock()
        with self._lock:
            failures, _until, last = self._clients.pop(client, (0, 0.0, now))
            if now - last > self.forget_s:
                failures = 0
            failures += 1
            lock_s = 0.0 if failures <= self.free else min(self.cap_s, self.base_s * 2 ** (failures - self.free - 1))
            self._clients[client] = (failures, now + lock_s, now)
            while len(self._clients) > self.max_clients:
                self._clients.popitem(last=False)
            return lock_s

    def succeeded(self, client: str) -> None:
        """Forget `client`'s failures: whoever holds the token has nothing left to guess."""
        if client in self._clients:
            with self._lock:
                self._clients.pop(client, None)


def _throttled(retry_s: float, page: bool) -> Response:
    seconds = max(1, math.ceil(retry_s))
    message = (f"too many wrong access tokens from this address; try again in {seconds} s "
               f"(ask whoever started the app for the token)")
    if page:
        resp = make_response(render_template("login.html", failed=False, retry_after=seconds), 429)
    else:
        resp = _error(429, message)
    resp.headers["Retry-After"] = str(seconds)
    return resp


def _same_origin(origin: str) -> bool:
    """True when an Origin header names this server."""
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.netloc == request.host


def install(app: Flask) -> None:
    """Register the Host check, token check, CSRF check and security headers on `app`."""
    throttle = app.extensions.setdefault("poseloop_throttle", GuessThrottle())

    @app.before_request
    def _guard() -> Response | None:
        cfg: AppConfig = current_app.config["POSELOOP"]
        host = request_host_name(request.host)
        if not host_allowed(host, cfg):
            return _host_refused(host, cfg)
        token = cfg.token
        is_api = request.path.startswith("/api/")
        is_page = not is_api and not request.path.startswith("/media/")
        if token and not request.path.startswith(PUBLIC_PREFIXES):
            client = request.remote_addr or "?"
            given = request.args.get("token")
            from_url = given is not None and request.method == "GET" and not is_api
            ok = _token_check(token) if not from_url else None
            if from_url or ok is not None:
                # Only requests that carry a token are guesses; a locked address is not even checked.
                retry_s = throttle.retry_after(client)
                if retry_s > 0:
                    return _throttled(retry_s, page=is_page)
            if from_url:
                if not hmac.compare_digest(given.encode("utf-8", "replace"), token.encode()):  # type: ignore[union-attr]
                    throttle.failed(client)
                    return make_response(render_template("login.html", failed=True), 401)
                throttle.succeeded(client)
                # Move the token from the URL into a cookie so it leaves the address bar and history.
                rest = {k: v for k, v in request.args.items() if k != "token"}
                resp = redirect(request.path + ("?" + urlencode(rest) if rest else ""))
                resp.set_cookie(COOKIE, _digest(token), httponly=True, samesite="Strict", max_age=30 * 86400)
                return resp
            if ok:
                throttle.succeeded(client)
            else:
                if ok is False:
                    throttle.failed(client)
                if not is_page:
                    return _error(401, "access token required: send the X-Poseloop-Token header "
                                       "or open the page with ?token=TOKEN once")
                return make_response(render_template("login.html", failed=ok is False), 401)
        if request.method in UNSAFE_METHODS:
            # A cross-site form can only send form or text/plain bodies, and a cross-site script sending
            # JSON needs a CORS preflight that this app never grants; the Origin check covers the rest.
            origin = request.headers.get("Origin")
            if origin is not None and not _same_origin(origin):
                return _error(403, f"cross-site request refused (Origin {origin} is not {request.host})")
            if request.headers.get("Sec-Fetch-Site") == "cross-site":
                return _error(403, "cross-site request refused")
            if not request.is_json:
                return _error(415, "state-changing requests must send Content-Type: application/json")
        return None

    @app.after_request
    def _headers(resp: Response) -> Response:
        resp.headers.setdefault("Content-Security-Policy", CSP)
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("X-Frame-Options", "DENY")
        resp.headers.setdefault("Referrer-Policy", "no-referrer")
        if request.path.startswith("/api/"):
            resp.headers.setdefault("Cache-Control", "no-store")
        return resp
