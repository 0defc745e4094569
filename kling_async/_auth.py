"""Credentials: a plain Bearer key, or the official API's short-lived HS256 JWT.

Pure code (PyJWT signs in memory): the transport asks for an ``Authorization`` header value with
the current time and, after a token refusal, calls :meth:`Credentials.refresh`.  Neither class
lets its secret reach a ``repr`` or an exception message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from ._errors import ValidationError

__all__ = [
    "ENV_ACCESS_KEY",
    "ENV_API_KEY",
    "ENV_SECRET_KEY",
    "BearerKey",
    "Credentials",
    "KlingJwt",
    "credentials_for",
]

#: Environment variables a client constructor given no key reads (the CLI reads the same ones).
ENV_API_KEY = "KLING_API_KEY"
ENV_ACCESS_KEY = "KLING_ACCESS_KEY"
ENV_SECRET_KEY = "KLING_SECRET_KEY"


class Credentials(Protocol):
    """What the transport needs from credentials."""

    def authorization(self, now: float) -> str:
        """The ``Authorization`` header value to send at Unix time ``now``."""
        ...

    def refresh(self) -> bool:
        """Forget any cached token; True when a new one may be accepted where the old was not."""
        ...


def _check_secret(field: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(field, "must be a non-empty string")
    if any(ch in value for ch in "\r\n") or value != value.strip():
        # A newline in a header value would let a caller's key inject headers.
        raise ValidationError(field, "must not contain line breaks or surrounding spaces")
    return value


class BearerKey:
    """A static API key, sent as ``Authorization: Bearer <key>`` (gateways, newer accounts)."""

    __slots__ = ("_header",)

    def __init__(self, api_key: str) -> None:
        self._header = "Bearer " + _check_secret("api_key", api_key)

    def authorization(self, now: float) -> str:
        """The header value; the same at any time."""
        return self._header

    def refresh(self) -> bool:
        """A static key cannot be renewed."""
        return False

    def __repr__(self) -> str:
        return "BearerKey(api_key=<hidden>)"


class KlingJwt:
    """The official API's token: HS256, ``iss`` = access key, valid 30 minutes.

    The scheme is in docs/protocol.md, JWT auth.

    A token is minted on first use, cached and minted again ``renew_margin`` seconds before it
    expires.  ``nbf`` lies 5 s in the past so that a server clock slightly behind ours accepts it;
    after a refusal (:meth:`refresh`) tokens date it back ``refused_skew`` seconds instead.
    """

    __slots__ = ("_access_key", "_expires", "_secret_key", "_skew", "_token")

    lifetime = 1800.0
    not_before_skew = 5.0
    #: How far back ``nbf`` lies in tokens minted after a refusal (see :meth:`refresh`).
    refused_skew = 300.0
    renew_margin = 300.0

    def __init__(self, access_key: str, secret_key: str) -> None:
        self._access_key = _check_secret("access_key", access_key)
        self._secret_key = _check_secret("secret_key", secret_key)
        self._token: str | None = None
        self._expires = 0.0
        self._skew = self.not_before_skew

    def authorization(self, now: float) -> str:
        """A valid token's header value, minting a new token when the cached one is near expiry."""
        if self._token is None or now >= self._expires - self.renew_margin:
            self._token = self._mint(now)
            self._expires = int(now) + self.lifetime
        return "Bearer " + self._token

    def refresh(self) -> bool:
        """Drop the cached token; the next request carries a fresh one.

        The official API is reported to refuse correct tokens now and then with "signature
        invalid"; a fresh token and one retry fixes it (docs/protocol.md, JWT auth).  Minted in
        the same second with the same claims, the "fresh" token would be the refused one, byte
        for byte; and a server clock more than 5 s behind ours refuses every token as not yet
        valid (1003).  So from now on ``nbf`` lies ``refused_skew`` seconds back: the next token
        differs from the refused one, and a server clock up to that much behind accepts it (an
        earlier ``nbf`` only widens the token's start; it still expires ``lifetime`` from now).
        """
        self._token = None
        self._skew = self.refused_skew
        return True

    def _mint(self, now: float) -> str:
        import jwt  # imported on first use: Bearer-key clients never load PyJWT (start-up time)

        claims = {
            "iss": self._access_key,
            "exp": int(now + self.lifetime),
            "nbf": int(now - self._skew),
        }
        return jwt.encode(claims, self._secret_key, algorithm="HS256", headers={"typ": "JWT"})

    def __repr__(self) -> str:
        return "KlingJwt(access_key=<hidden>, secret_key=<hidden>)"


def credentials_for(
    *,
    api_key: str | None,
    access_key: str | None = None,
    secret_key: str | None = None,
    jwt_allowed: bool,
    environ: Mapping[str, str],
) -> Credentials:
    """The credentials the keys given make, else those the environment holds.

    Keys given as arguments win, and are never mixed with the environment's.  With none given,
    ``KLING_API_KEY`` is a Bearer key; else, where a JWT is allowed (the official format),
    ``KLING_ACCESS_KEY`` and ``KLING_SECRET_KEY`` together.  Values from the environment lose
    surrounding white space (a trailing newline from a file is common).  Raises
    :class:`ValidationError` naming what is missing; no message contains a key.
    """
    if api_key is not None:
        if access_key is not None or secret_key is not None:
            raise ValidationError("api_key", "give either api_key or access_key + secret_key")
        return BearerKey(api_key)
    if access_key is not None and secret_key is not None:
        return KlingJwt(access_key, secret_key)
    if access_key is not None or secret_key is not None:
        missing = "secret_key" if access_key is not None else "access_key"
        raise ValidationError(missing, "give access_key and secret_key together, or api_key")
    env_key = environ.get(ENV_API_KEY, "").strip()
    if env_key:
        return BearerKey(_check_secret(ENV_API_KEY, env_key))
    if not jwt_allowed:
        raise ValidationError("api_key", f"not given, and {ENV_API_KEY} is not set")
    access = environ.get(ENV_ACCESS_KEY, "").strip()
    secret = environ.get(ENV_SECRET_KEY, "").strip()
    if access and secret:
        return KlingJwt(
            _check_secret(ENV_ACCESS_KEY, access), _check_secret(ENV_SECRET_KEY, secret)
        )
    if access or secret:
        missing = ENV_SECRET_KEY if access else ENV_ACCESS_KEY
        raise ValidationError(
            missing, f"is not set, and {ENV_ACCESS_KEY} and {ENV_SECRET_KEY} go together"
        )
    raise ValidationError(
        "api_key",
        f"not given (nor access_key + secret_key), and neither {ENV_API_KEY} nor"
        f" {ENV_ACCESS_KEY} + {ENV_SECRET_KEY} is set",
    )
