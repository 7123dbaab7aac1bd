"""How every fsw process reaches the Redis the portal uses: the same environment variables, read one way.

`fsw-worker` and `fsw-index build --fleet` both talk to the portal's Redis, and an operator configures
both alike: `REDIS_URL` (redis://, rediss:// for TLS, unix://), or `REDIS_HOST`, `REDIS_PORT`,
`REDIS_PASSWORD` (the portal's own variables). These functions live here, in the contracts, because the
indexer may not import the worker (imports go indexer -> matcher/schemas and worker -> matcher/schemas):
the variables are a contract with the operator, like the queue names are one with the portal.
A Redis password is never shown, however it is given (`redis://:<password>@host`, `redis://user:<password>@host`,
`redis://host/0?password=pw`, REDIS_PASSWORD): log `redis_display(url)`, never the URL.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from redis.asyncio.connection import SSLConnection, parse_url

# A Redis on the same machine, as a portal and its workers are usually run.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379"
# A Redis that has not accepted a connection in 5 s is away: report it and retry, rather than hang.
CONNECT_TIMEOUT_S = 5
# Query parameters that carry a credential: redis-py passes `?password=` (any parameter) to the connection.
_SECRET_PARAM = re.compile(r"(^|[?&])([^=&?#]*(?:pass|secret|token)[^=&#]*)=[^&#]*", re.IGNORECASE)


class SettingsError(ValueError):
    """A configuration value that cannot work; the message names the variable and the fix."""


def redis_url(env: Mapping[str, str]) -> str:
    """The Redis URL from `REDIS_URL`, or from `REDIS_HOST`, `REDIS_PORT` and `REDIS_PASSWORD`."""
    url = env.get("REDIS_URL", "").strip()
    if url:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise SettingsError("REDIS_URL must start with redis://, rediss:// (TLS) or unix://")
        return url
    host = env.get("REDIS_HOST", "").strip() or "127.0.0.1"
    port = env.get("REDIS_PORT", "").strip() or "6379"
    if not port.isdigit():
        raise SettingsError(f"REDIS_PORT must be a port number, not {port!r}")
    given = env.get("REDIS_PASSWORD", "")
    auth = f":{quote(given, safe='')}@" if given else ""
    return f"redis://{auth}{host}:{port}"


def redis_display(url: str) -> str:
    """The Redis URL with any password masked: the only form that may be logged.

    Masked: all before the last `@` but a user name (`redis://:***@host`, `redis://user:***@host`; a lone
    `redis://***@host`, which may be a password), and the values of password-like query parameters (shown as `***`).
    The last `@`, not the URL parser's idea of the user part: a password may hold an unescaped `/`, `?`
    or `#` that ends the parser's authority early.
    """
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        userinfo, _, rest = rest.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        rest = (f"{user}:***@" if colon else "***@") + rest
    return scheme + sep + _SECRET_PARAM.sub(r"\1\2=***", rest)


def redis_kwargs(url: str, client_name: str | None = None) -> dict[str, Any]:
    """Keyword arguments for `redis.asyncio.Redis` and BullMQ's `connection` (host, port, password, TLS...).

    `client_name` is set on every connection made with them, reconnections included. ValueError for a
    URL redis-py cannot use.
    """
    kwargs: dict[str, Any] = dict(parse_url(url))
    if kwargs.pop("connection_class", None) is SSLConnection:
        kwargs["ssl"] = True
    elif "path" in kwargs:
        kwargs["unix_socket_path"] = kwargs.pop("path")
    kwargs.setdefault("socket_connect_timeout", CONNECT_TIMEOUT_S)
    if client_name:
        kwargs["client_name"] = client_name
    return kwargs
