"""Building a client: keys from the environment, typed options, and the asyncio-only rule."""

from __future__ import annotations

import inspect
import logging
import time

import pytest
import trio
from helpers import FAST_POLL, FAST_RETRY, audio_job, text_job

import kling_async as ka
from kling_async.testing import FakeKlingServer

ENV_NAMES = ("KLING_API_KEY", "KLING_ACCESS_KEY", "KLING_SECRET_KEY")
ACCESS_KEY, SECRET_KEY = "ak-sandbox", "sk-sandbox-secret-for-hs256-tokens"
SECRET = "sk-env-secret-0c9e4b"


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """A clean environment: none of the key variables set (the tester's own are hidden)."""
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# -- keys from the environment -----------------------------------------------------------------


@pytest.mark.anyio
async def test_every_constructor_reads_kling_api_key(env: pytest.MonkeyPatch) -> None:
    env.setenv("KLING_API_KEY", SECRET + "\n")  # as `export K=$(cat key.txt)` may leave it
    async with FakeKlingServer(task_duration=0.01, api_keys=(SECRET,)) as server:
        clients = [
            ka.KlingClient.kling(base_url=server.url, poll=FAST_POLL, retry=FAST_RETRY),
            ka.KlingClient.dmxapi(base_url=server.url, poll=FAST_POLL, retry=FAST_RETRY),
            ka.KlingClient.apimodels(base_url=server.url, poll=FAST_POLL, retry=FAST_RETRY),
        ]
        for client in clients:
            async with client:
                snapshot = await client.submit(audio_job(1))
            assert snapshot.task_id in server.tasks
    assert server.requests["rejected"] == 0


@pytest.mark.anyio
async def test_kling_mints_a_jwt_from_the_access_and_secret_keys(env: pytest.MonkeyPatch) -> None:
    env.setenv("KLING_ACCESS_KEY", ACCESS_KEY)
    env.setenv("KLING_SECRET_KEY", SECRET_KEY)
    async with FakeKlingServer(task_duration=0.01, api_keys=()) as server:
        async with ka.KlingClient.kling(base_url=server.url, retry=FAST_RETRY) as client:
            snapshot = await client.submit(text_job(1))
    assert snapshot.task_id in server.tasks  # no Bearer key is accepted: it was a JWT


@pytest.mark.anyio
async def test_keys_given_win_over_the_environment(env: pytest.MonkeyPatch) -> None:
    env.setenv("KLING_API_KEY", "sk-wrong")
    async with FakeKlingServer(task_duration=0.01) as server:
        given = ka.KlingClient.kling(api_key="sk-sandbox", base_url=server.url, retry=FAST_RETRY)
        async with given:
            await given.submit(text_job(1))
        jwt = ka.KlingClient.kling(
            access_key=ACCESS_KEY, secret_key=SECRET_KEY, base_url=server.url, retry=FAST_RETRY
        )
        async with jwt:
            await jwt.submit(text_job(2))
        # And the environment's key is what a client without one really sends.
        from_env = ka.KlingClient.dmxapi(base_url=server.url, retry=FAST_RETRY)
        with pytest.raises(ka.AuthenticationError):
            async with from_env:
                await from_env.submit(text_job(3))
    assert server.tasks_created == 2


def test_no_key_anywhere_names_the_variables(env: pytest.MonkeyPatch) -> None:
    env.setenv("KLING_API_KEY", "   ")  # blank counts as unset
    with pytest.raises(ka.ValidationError) as kling:
        ka.KlingClient.kling()
    assert kling.value.field == "api_key"
    assert all(name in str(kling.value) for name in ENV_NAMES)
    for constructor in (ka.KlingClient.dmxapi, ka.KlingClient.apimodels):
        with pytest.raises(ka.ValidationError) as bearer:
            constructor()
        assert bearer.value.field == "api_key" and "KLING_API_KEY" in str(bearer.value)
        assert "KLING_ACCESS_KEY" not in str(bearer.value)  # no JWT at gateways


def test_half_a_key_pair_names_the_missing_half(env: pytest.MonkeyPatch) -> None:
    env.setenv("KLING_ACCESS_KEY", ACCESS_KEY)
    with pytest.raises(ka.ValidationError) as missing:
        ka.KlingClient.kling()
    assert missing.value.field == "KLING_SECRET_KEY"
    with pytest.raises(ka.ValidationError) as given_half:
        ka.KlingClient.kling(secret_key=SECRET_KEY)  # given keys never mix with the env's
    assert given_half.value.field == "access_key"


@pytest.mark.anyio
async def test_keys_from_the_environment_stay_out_of_reprs_errors_and_logs(
    env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    env.setenv("KLING_API_KEY", SECRET[:6] + "\n" + SECRET[6:])
    with pytest.raises(ka.ValidationError) as broken:
        ka.KlingClient.dmxapi()
    assert broken.value.field == "KLING_API_KEY"
    assert SECRET[:6] not in str(broken.value) and SECRET[6:] not in str(broken.value)

    caplog.set_level(logging.DEBUG, logger="kling_async")
    env.setenv("KLING_API_KEY", SECRET)
    async with FakeKlingServer(task_duration=0.01, api_keys=(SECRET,)) as server:
        client = ka.KlingClient.kling(base_url=server.url, poll=FAST_POLL, retry=FAST_RETRY)
        async with client:
            results = [r async for r in client.run_batch([text_job(1), text_job(2)])]
    assert all(r.ok for r in results)
    shown = repr(client) + repr(client._requester.transport._credentials) + caplog.text
    assert "POST" in caplog.text  # the DEBUG line per request was written
    assert SECRET not in shown + "".join(repr(r) for r in results)


# -- typed options -----------------------------------------------------------------------------


def test_batch_methods_take_named_options_only() -> None:
    for method in (ka.KlingClient.run_batch, ka.KlingClient.track):
        kinds = {p.kind for p in inspect.signature(method).parameters.values()}
        assert inspect.Parameter.VAR_KEYWORD not in kinds, method
    named = inspect.signature(ka.KlingClient.run_batch).parameters
    assert {"journal", "resubmit_unknown", "retry_failed", "download_to"} <= set(named)


def test_client_options_name_every_option_of_the_client() -> None:
    # The constructors' **options are typed by ClientOptions: it must list exactly the
    # options __init__ takes (besides what each constructor builds itself).
    built = {"self", "dialect", "credentials", "base_url"}
    init = set(inspect.signature(ka.KlingClient.__init__).parameters) - built
    assert set(ka.ClientOptions.__annotations__) == init
    assert ka.ClientOptions.__total__ is False


@pytest.mark.anyio
async def test_unknown_options_are_refused_at_the_call() -> None:
    async with (
        FakeKlingServer() as server,
        ka.KlingClient.kling(api_key="sk-sandbox", base_url=server.url) as client,
    ):
        with pytest.raises(TypeError, match="jorunal"):
            client.run_batch([], jorunal="x.journal")  # type: ignore[call-arg]
        with pytest.raises(ka.ValidationError, match="retry_failed"):
            client.run_batch([], retry_failed=True)  # it reads the failures in a journal
    assert server.requests["submit"] == 0


# -- asyncio only ------------------------------------------------------------------------------


def test_opening_a_client_under_trio_fails_at_once() -> None:
    client = ka.KlingClient.dmxapi(api_key="sk-sandbox", base_url="http://127.0.0.1:9")

    async def main() -> None:
        async with client:
            raise AssertionError("the client opened under trio")

    started = time.monotonic()
    with pytest.raises(RuntimeError, match="asyncio") as refused:
        trio.run(main)
    assert time.monotonic() - started < 1.0  # no connection attempt, no time-out
    assert "trio" in str(refused.value)
    assert repr(client).startswith("KlingClient(")  # the client itself is left as it was
