"""Standard Webhooks signatures: how Kling signs its callbacks, checked and made (pure, no I/O).

Once an account creates a Webhook Secret (``whsec_`` + base64 of the key) every callback carries
``webhook-id``, ``webhook-timestamp`` (Unix seconds) and ``webhook-signature``: one or more
space-separated ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``, several while a key is
rotated (any match passes).  Timestamps more than five minutes from now are refused, so a
recorded callback cannot be replayed later (docs/protocol.md, Signed callbacks).

Written with the standard library rather than the ``standardwebhooks`` package Kling's docs
recommend: its ``Webhook.verify`` reads the wall clock itself (no injectable clock for tests of
the five-minute window), decodes the body as UTF-8 text (a body that is not raises
``UnicodeDecodeError``), and a malformed signature entry (no comma, bad base64) escapes as a
``ValueError`` or ``binascii.Error`` instead of a refusal.  What it does is about forty lines of
``hmac``, ``hashlib`` and ``base64``, all kept here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
from collections.abc import Iterable, Mapping

from ._errors import CallbackSignatureError, ValidationError

__all__ = [
    "ID_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "TOLERANCE",
    "WebhookSecret",
    "lower_headers",
]

#: The three headers of a signed callback (compared in any case).
ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
#: How far a callback's timestamp may be from now, in seconds (Standard Webhooks: 5 minutes).
TOLERANCE = 300.0

_PREFIX = "whsec_"
# Bounds on what is parsed from headers a stranger controls.
_MAX_SIGNATURES = 16
_MAX_HEADER = 4096


def lower_headers(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> dict[str, str]:
    """``headers`` with lower-case names (the last of repeated names wins)."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    return {str(name).lower(): str(value) for name, value in items}


def _key(secret: str) -> bytes:
    if not isinstance(secret, str):
        raise ValidationError("webhook_secret", "must be a string such as 'whsec_...'")
    encoded = secret.strip()
    if encoded.startswith(_PREFIX):
        encoded = encoded[len(_PREFIX) :]
    try:
        # Unpadded base64 is accepted, as the reference implementations do.
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValidationError("webhook_secret", "must be 'whsec_' followed by base64") from None
    if len(key) < 16:
        raise ValidationError("webhook_secret", "must hold a key of at least 16 bytes")
    return key


class WebhookSecret:
    """One or more webhook secrets (``whsec_...``): verify callbacks, or sign them (tests).

    Several secrets may be given while a key is rotated on the receiving side; a callback passes
    when any of its signatures matches any of them.  The keys never appear in a repr.
    """

    def __init__(self, secrets: str | Iterable[str]) -> None:
        if isinstance(secrets, str):
            given = [secrets]
        elif isinstance(secrets, (list, tuple, set, frozenset)):
            given = list(secrets)
        else:
            raise ValidationError("webhook_secret", "must be 'whsec_...' or a list of them")
        if not given:
            raise ValidationError("webhook_secret", "give at least one secret")
        self._keys = tuple(_key(secret) for secret in given)

    def __repr__(self) -> str:
        return f"WebhookSecret(<{len(self._keys)} hidden>)"

    def sign(self, msg_id: str, timestamp: int, body: bytes) -> str:
        """The ``webhook-signature`` value of ``body``: one ``v1,<sig>`` per secret."""
        return " ".join(
            "v1," + base64.b64encode(_mac(key, msg_id, str(timestamp), body)).decode("ascii")
            for key in self._keys
        )

    def headers(self, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
        """The three headers a signed callback carries."""
        return {
            ID_HEADER: msg_id,
            TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: self.sign(msg_id, timestamp, body),
        }

    def verify(self, body: bytes, headers: Mapping[str, str], *, now: float) -> None:
        """Return when ``body`` is signed by one of the secrets; else raise.

        ``headers`` must have lower-case names (:func:`lower_headers`); ``now`` is Unix seconds.
        Raises :class:`CallbackSignatureError` saying which check failed (never quoting a
        signature or a secret).
        """
        msg_id = headers.get(ID_HEADER)
        stamp = headers.get(TIMESTAMP_HEADER)
        signatures = headers.get(SIGNATURE_HEADER)
        if not (msg_id and stamp and signatures):
            raise CallbackSignatureError("missing webhook-id, webhook-timestamp or signature")
        if len(msg_id) > _MAX_HEADER or len(signatures) > _MAX_HEADER:
            raise CallbackSignatureError("signature headers too long")
        stamp = stamp.strip()
        if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12):
            raise CallbackSignatureError("webhook-timestamp is not Unix seconds")
        if not (math.isfinite(now) and abs(int(stamp) - now) <= TOLERANCE):
            raise CallbackSignatureError("webhook-timestamp is more than 5 minutes from now")
        wanted = [_mac(key, msg_id, stamp, body) for key in self._keys]
        matched = False
        for entry in signatures.split()[:_MAX_SIGNATURES]:
            version, _, encoded = entry.partition(",")
            if version != "v1" or not encoded:
                continue
            try:
                given = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                continue
            for expected in wanted:
                # Every comparison runs (no early exit): timing tells nothing about which.
                matched |= hmac.compare_digest(expected, given)
        if not matched:
            raise CallbackSignatureError("no signature matches")


def _mac(key: bytes, msg_id: str, stamp: str, body: bytes) -> bytes:
    signed = msg_id.encode("utf-8", "surrogatepass") + b"." + stamp.encode("ascii") + b"." + body
    return hmac.new(key, signed, hashlib.sha256).digest()
