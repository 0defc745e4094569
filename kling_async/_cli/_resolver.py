"""Reaching the sandbox by its fixed name (:data:`~._sandbox.SANDBOX_URL`) at any free port."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from ._sandbox import SANDBOX_URL

__all__ = ["sandbox_session"]


def sandbox_session(port: int) -> aiohttp.ClientSession:
    """An aiohttp session that reaches :data:`SANDBOX_URL` at ``port`` on this machine."""
    connector = aiohttp.TCPConnector(resolver=_SandboxResolver(port))
    return aiohttp.ClientSession(connector=connector, raise_for_status=False)


class _SandboxResolver(AbstractResolver):
    """Resolves the sandbox's name to the loopback port it listens on; other names as usual."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._usual = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """The addresses of ``host`` (the sandbox's name: 127.0.0.1 at the server's port)."""
        if host != urlsplit(SANDBOX_URL).hostname:
            return await self._usual.resolve(host, port, family)
        loopback: ResolveResult = {
            "hostname": host,
            "host": "127.0.0.1",
            "port": self._port,
            "family": socket.AF_INET,
            "proto": 0,
            "flags": socket.AI_NUMERICHOST,
        }
        return [loopback]

    async def close(self) -> None:
        """Close the usual resolver."""
        await self._usual.close()
