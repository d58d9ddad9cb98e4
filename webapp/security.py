"""Access token, cross-site request protection and response headers."""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import urlencode, urlsplit

from flask import Flask, Response, current_app, jsonify, make_response, redirect, render_template, request

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


def _token_ok(expected: str) -> bool:
    """True when the request carries the token in a header or the session cookie."""
    auth = request.headers.get("Authorization", "")
    given = request.headers.get(TOKEN_HEADER) or (auth[7:] if auth.startswith("Bearer ") else None)
    if given is not None:
        return hmac.compare_digest(given.encode(), expected.encode())
    cookie = request.cookies.get(COOKIE)
    return cookie is not None and hmac.compare_digest(cookie.encode(), _digest(expected).encode())


def _error(status: int, message: str) -> Response:
    resp = jsonify(error=message)
    resp.status_code = status
    return resp


def _same_origin(origin: str) -> bool:
    """True when an Origin header names this server."""
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.netloc == request.host


def install(app: Flask) -> None:
    """Register the token check, CSRF check and security headers on `app`."""

    @app.before_request
    def _guard() -> Response | None:
        token: str | None = current_app.config["POSELOOP"].token
        is_api = request.path.startswith("/api/")
        if token and not request.path.startswith(PUBLIC_PREFIXES):
            given = request.args.get("token")
            if given is not None and request.method == "GET" and not is_api:
                if not hmac.compare_digest(given.encode(), token.encode()):
                    return make_response(render_template("login.html", failed=True), 401)
                # Move the token from the URL into a cookie so it leaves the address bar and history.
                rest = {k: v for k, v in request.args.items() if k != "token"}
                resp = redirect(request.path + ("?" + urlencode(rest) if rest else ""))
                resp.set_cookie(COOKIE, _digest(token), httponly=True, samesite="Strict", max_age=30 * 86400)
                return resp
            if not _token_ok(token):
                if is_api or request.path.startswith("/media/"):
                    return _error(401, "access token required: send the X-Poseloop-Token header "
                                       "or open the page with ?token=TOKEN once")
                return make_response(render_template("login.html", failed=False), 401)
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
