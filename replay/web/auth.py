"""Who may read the web console: loopback addresses, the bearer token and the login cookie.

Pure logic. Without RABBIT_ARCHIVE_WEB_TOKEN the console listens on loopback only and answers
only requests addressed to a loopback name (a web page elsewhere cannot reach it by pointing
a DNS name at 127.0.0.1). With a token every request carries it, as `Authorization: Bearer`
or as the cookie the login form sets: the cookie holds an expiry and an HMAC of it keyed by
the token, never the token itself, so changing the token ends every session.
"""

import hashlib
import hmac
import ipaddress
import time

COOKIE = "rabbit_archive_console"
SESSION_SECONDS = 12 * 3600
_VERSION = "v1"


def is_loopback(host: str) -> bool:
    """True for localhost and addresses in 127.0.0.0/8 or ::1 (brackets allowed)."""
    name = host.strip().strip("[]").lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_of(header: str) -> str:
    """The host part of a Host header (`127.0.0.1:9188`, `[::1]:9188`, `localhost`)."""
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()


def token_matches(token: str, given: str) -> bool:
    """Constant-time comparison (of digests, so the time says nothing about the length either)."""
    return hmac.compare_digest(_digest(token), _digest(given))


def bearer_matches(token: str, authorization: str) -> bool:
    """True when an Authorization header is `Bearer <token>`."""
    scheme, _, given = authorization.strip().partition(" ")
    return scheme.lower() == "bearer" and token_matches(token, given.strip())


def _mac(token: str, expires: int) -> str:
    message = f"{_VERSION}.{expires}".encode()
    return hmac.new(_digest(token), message, hashlib.sha256).hexdigest()


def session_cookie(token: str, now: float | None = None) -> str:
    """The login cookie's value: valid for SESSION_SECONDS and for this token only."""
    expires = int(now if now is not None else time.time()) + SESSION_SECONDS
    return f"{_VERSION}.{expires}.{_mac(token, expires)}"


def session_valid(token: str, value: str, now: float | None = None) -> bool:
    """True for an unexpired cookie that this token signed."""
    version, _, rest = value.partition(".")
    expires_text, _, mac = rest.partition(".")
    if version != _VERSION or not expires_text.isdigit():
        return False
    expires = int(expires_text)
    if expires <= (now if now is not None else time.time()):
        return False
    return hmac.compare_digest(_mac(token, expires), mac)


def safe_next(path: str) -> str:
    """Where to go after logging in: a path of this console only, never another site."""
    if not path.startswith("/") or path.startswith(("//", "/\\")) or any(ch in path for ch in "\r\n"):
        return "/"
    return path
