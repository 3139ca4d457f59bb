"""Bearer tokens: the admin token of ``POST /fit`` and the optional reader token of ``/info`` and the docs.

Tokens are compared in constant time (``secrets.compare_digest`` on bytes) and never logged.
The reader token (``GGA_READ_TOKEN``) guards what describes the deployment: ``/info``
(model, classes, artifact directory, detector configuration) and the API docs
(``/docs``, ``/redoc``, ``/openapi.json``). Unset, those stay open. Either token opens
them. Besides ``Authorization: Bearer <token>``, HTTP Basic with the token as the password
(any user name) is accepted there, so that a browser can open ``/docs``: it asks for the
credentials when it sees the ``Basic`` challenge of the 401.
"""

from __future__ import annotations

import base64
import binascii
import secrets

from pydantic import SecretStr

READER_PATHS = frozenset({"/info", "/docs", "/redoc", "/openapi.json"})


def secret_of(token: SecretStr | None) -> str:
    """The token's text, stripped; "" when unset (Settings turns blank tokens into None)."""
    return token.get_secret_value().strip() if token is not None else ""


def presented(authorization: str, *, basic: bool = False) -> bytes | None:
    """The token a client presents in an Authorization header value, as raw bytes: ``Bearer <token>``,
    or with ``basic`` also ``Basic base64(user:token)``; None when there is none (or it is malformed).

    Header values arrive latin-1 decoded (ASGI), so encoding them back gives the bytes sent.
    """
    scheme, _, value = authorization.partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        return value.encode("latin-1")
    if basic and scheme.lower() == "basic" and value:
        try:
            decoded = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return None
        _, sep, password = decoded.partition(b":")
        return password if sep and password else None
    return None


def matches(given: bytes | None, *tokens: str) -> bool:
    """Whether ``given`` equals one of the non-empty ``tokens`` (UTF-8); each is compared in constant time."""
    if not given:
        return False
    found = False
    for token in tokens:
        if token:
            found |= secrets.compare_digest(given, token.encode("utf-8"))
    return found
