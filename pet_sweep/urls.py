"""URLs of the stores: passwords hidden wherever a URL leaves the process, HTTP basic auth, sqlite files."""

from __future__ import annotations

import base64
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from pet_sweep.errors import ConfigError

REDACTED = "***"  # what `redact_url` writes in place of a password


def redact_url(url: str) -> str:
    """Hide the password of a database or server URL (``postgresql://u:***@host/db``)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:{REDACTED}@{netloc[1]}"))


def redact_url_in(text: str, url: str) -> str:
    """Remove a URL's password from a message (drivers quote it in some errors)."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return text
    if not password or password == REDACTED:
        return text
    for form in {password, unquote(password)}:  # a driver may quote it percent-decoded
        text = text.replace(form, REDACTED)
    return text


def is_redacted(url: str) -> bool:
    """Whether `url`'s password is the placeholder `redact_url` writes (an exported config's URLs)."""
    try:
        return urlsplit(url).password == REDACTED
    except ValueError:
        return False


def require_password(url: str, variable: str, *, file: str | None = None, key: str | None = None) -> str:
    """`url` itself, unless its password was redacted: then say which variable gives the real one."""
    if is_redacted(url):
        raise ConfigError(f"{url} has its password removed (export writes {REDACTED} in its place); "
                          f"set {variable} to the full URL", file=file, key=key)
    return url


def open_http(url: str, timeout: float) -> Any:
    """`urlopen` that sends a URL's ``user:password@`` as HTTP basic auth, as MLflow's client does.

    urllib would take the password for part of the host (and quote it in its error).
    """
    parts = urlsplit(url)
    request = urllib.request.Request(urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1])))
    if parts.username is not None:
        login = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        request.add_header("Authorization", "Basic " + base64.b64encode(login).decode())
    return urllib.request.urlopen(request, timeout=timeout)


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL (None for other URLs and in-memory databases)."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or ":memory:" in url:
        return None
    return Path(url[len(prefix):].split("?", 1)[0])
