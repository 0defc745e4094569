"""From command-line options and environment variables to a :class:`KlingClient`.

Keys come from ``--api-key`` or ``KLING_API_KEY`` (a Bearer key, any dialect), else, for the
official API, ``KLING_ACCESS_KEY`` + ``KLING_SECRET_KEY`` (a JWT is minted from them;
docs/protocol.md, JWT auth).  No message here ever contains a key.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where a client is made: `--help` and usage errors need no aiohttp
    from .._client import KlingClient

__all__ = ["DIALECTS", "CliError", "add_connection_options", "make_client"]

DIALECTS = ("kling", "dmxapi", "apimodels")


class CliError(Exception):
    """A usage or setup problem, reported as one line and exit status 2."""


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    """The options that say which server to talk to, and how to authenticate."""
    group = parser.add_argument_group("server")
    group.add_argument(
        "--dialect",
        choices=DIALECTS,
        default="kling",
        help="the API format: the official Kling API or any gateway speaking it (kling, the "
        "default), the DMXAPI gateway (dmxapi), or apimodels.app (apimodels)",
    )
    group.add_argument(
        "--base-url",
        metavar="URL",
        help="the server (default: the dialect's: api-singapore.klingai.com, www.dmxapi.cn, "
        "apimodels.app)",
    )
    group.add_argument(
        "--prefix",
        metavar="P",
        help='path prefix of an official-format gateway, e.g. "/kling" '
        '(default: none for kling, "/kling" for dmxapi)',
    )
    group.add_argument(
        "--gateway",
        action="store_true",
        help="kling: the base URL is a gateway, which may send refusals with HTTP 200 (the "
        "default when --prefix is given): a cut-off HTTP 200 then never proves that a task "
        "was created",
    )
    group.add_argument(
        "--advanced",
        action="store_true",
        help="kling/dmxapi: use advanced lip-sync (identify-face, then advanced-lip-sync)",
    )
    group.add_argument(
        "--api-key",
        metavar="KEY",
        help="Bearer API key (better: set KLING_API_KEY, which stays out of your shell "
        "history; for the official API's JWT set KLING_ACCESS_KEY and KLING_SECRET_KEY)",
    )


def _env(environ: Mapping[str, str], name: str) -> str | None:
    return environ.get(name, "").strip() or None


def credentials(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, str]:
    """The credential keyword arguments for the client constructor of ``args.dialect``."""
    api_key = args.api_key or _env(environ, "KLING_API_KEY")
    if api_key:
        return {"api_key": api_key}
    access, secret = _env(environ, "KLING_ACCESS_KEY"), _env(environ, "KLING_SECRET_KEY")
    if args.dialect == "kling" and access and secret:
        return {"access_key": access, "secret_key": secret}
    if args.dialect == "kling" and (access or secret):
        missing = "KLING_SECRET_KEY" if access else "KLING_ACCESS_KEY"
        raise CliError(f"KLING_ACCESS_KEY and KLING_SECRET_KEY go together: set {missing} too")
    jwt = " (or KLING_ACCESS_KEY and KLING_SECRET_KEY)" if args.dialect == "kling" else ""
    raise CliError(
        f"no API key: pass --api-key or set KLING_API_KEY{jwt}; "
        "or try --sandbox, which needs no account"
    )


def make_client(
    args: argparse.Namespace,
    *,
    environ: Mapping[str, str] | None = None,
    creds: dict[str, str] | None = None,
    base_url: str | None = None,
    **options: Any,
) -> KlingClient:
    """A client for ``args.dialect``; ``creds`` and ``base_url`` override the options."""
    from .._client import KlingClient

    creds = creds if creds is not None else credentials(args, environ or os.environ)
    base_url = base_url or args.base_url
    if base_url:
        options["base_url"] = base_url
    if args.dialect == "apimodels":
        if args.prefix is not None:
            raise CliError("--prefix does not apply to --dialect apimodels")
        if args.advanced:
            raise CliError("--advanced does not apply to --dialect apimodels (it always is)")
        if args.gateway:
            raise CliError("--gateway does not apply to --dialect apimodels (it may be one)")
        return KlingClient.apimodels(api_key=creds["api_key"], **options)
    if args.prefix is not None:
        options["prefix"] = args.prefix
    if args.dialect == "dmxapi":
        return KlingClient.dmxapi(api_key=creds["api_key"], advanced=args.advanced, **options)
    return KlingClient.kling(
        advanced=args.advanced,
        gateway=True if args.gateway else None,
        api_key=creds.get("api_key"),
        access_key=creds.get("access_key"),
        secret_key=creds.get("secret_key"),
        **options,
    )
