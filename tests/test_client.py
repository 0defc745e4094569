"""KlingClient.submit / get_task against the fake server: auth, prefixes, retries, errors."""

from __future__ import annotations

import logging
import math

import aiohttp
import anyio
import pytest
from helpers import (
    API_KEY,
    FAST_POLL,
    FAST_RETRY,
    WAV,
    apimodels_client,
    audio_job,
    dmx_client,
    jwt_client,
    kling_client,
    requests_sent,
    text_job,
)

import kling_async as ka
from kling_async.testing import FakeKlingServer, FaultPlan

pytestmark = pytest.mark.anyio


async def wait_terminal(client: ka.KlingClient, task_id: str) -> ka.TaskSnapshot:
    with anyio.fail_after(5):
        while True:
            snap = await client.get_task(task_id)
            if snap.state.is_terminal:
                return snap
            await anyio.sleep(0.01)


async def test_submit_and_get_task_official_format_with_bearer_key() -> None:
    async with FakeKlingServer(task_duration=0.05) as server, kling_client(server) as client:
        snap = await client.submit(text_job(1))
        assert snap.state is ka.TaskState.SUBMITTED
        assert snap.task_id in server.tasks
        done = await wait_terminal(client, snap.task_id)
    assert done.state is ka.TaskState.SUCCEEDED
    assert done.video_url is not None and done.video_url.endswith(f"{snap.task_id}.mp4")
    assert server.requests["submit"] == 1
    assert server.tasks_created == 1


async def test_dmxapi_keeps_the_kling_prefix() -> None:
    async with FakeKlingServer(task_duration=0.02, prefixes=("/kling",)) as server:
        async with dmx_client(server) as client:
            snap = await client.submit(audio_job(1))
            done = await wait_terminal(client, snap.task_id)
    assert done.state is ka.TaskState.SUCCEEDED
    assert server.requests["submit"] == 1


async def test_jwt_credentials_are_accepted() -> None:
    async with FakeKlingServer(task_duration=0.02) as server:
        client = jwt_client(server, poll=FAST_POLL, retry=FAST_RETRY)
        async with client:
            snap = await client.submit(text_job(1))
            done = await wait_terminal(client, snap.task_id)
    assert done.state is ka.TaskState.SUCCEEDED


async def test_wrong_jwt_secret_is_an_authentication_error() -> None:
    async with FakeKlingServer() as server:
        client = ka.KlingClient.kling(
            access_key="ak-sandbox",
            secret_key="wrong-secret-of-the-right-length-32b",
            base_url=server.url,
            retry=FAST_RETRY,
        )
        async with client:
            with pytest.raises(ka.AuthenticationError) as info:
                await client.submit(text_job(1))
    assert info.value.status == 401
    assert "wrong-secret" not in str(info.value) + repr(info.value)
    assert server.tasks_created == 0


async def test_bad_key_is_fatal_and_not_retried() -> None:
    async with FakeKlingServer() as server:
        client = ka.KlingClient.kling(api_key="sk-nope", base_url=server.url, retry=FAST_RETRY)
        async with client:
            with pytest.raises(ka.AuthenticationError) as info:
                await client.get_task("123")
    assert info.value.fatal
    assert requests_sent(server) == 1


async def test_submit_retries_1303_and_5001_where_nothing_was_created() -> None:
    async with FakeKlingServer() as server, kling_client(server) as client:
        server.script("submit", status=429, code=1303, times=2)
        server.script("submit", status=503, code=5001, times=1)
        snap = await client.submit(text_job(1))
    assert snap.task_id in server.tasks
    assert server.tasks_created == 1


async def test_submit_is_not_repeated_after_an_ambiguous_5000() -> None:
    async with FakeKlingServer() as server, kling_client(server) as client:
        server.script("submit", status=500, code=5000, times=1)
        with pytest.raises(ka.ServerError) as info:
            await client.submit(text_job(1))
    assert info.value.code == 5000
    assert server.requests["submit"] == 1


async def test_business_error_sent_with_http_200_is_still_an_error() -> None:
    async with FakeKlingServer() as server, kling_client(server) as client:
        server.script("submit", status=400, code=1201, message="video_url is bad", as_http_200=True)
        with pytest.raises(ka.InvalidRequestError, match="video_url is bad") as info:
            await client.submit(text_job(1))
    assert info.value.status == 200 and info.value.code == 1201


async def test_queries_are_retried_on_server_errors() -> None:
    async with FakeKlingServer(task_duration=0.01) as server, kling_client(server) as client:
        snap = await client.submit(text_job(1))
        server.script("query", status=500, code=5000, times=3)
        again = await client.get_task(snap.task_id)
    assert again.task_id == snap.task_id
    assert server.requests["query"] == 4


async def test_data_as_a_list_quirk_is_understood() -> None:
    faults = FaultPlan(data_as_list=True)
    async with FakeKlingServer(task_duration=0.01, faults=faults) as server:
        async with kling_client(server) as client:
            snap = await client.submit(text_job(1))
            done = await wait_terminal(client, snap.task_id)
    assert done.state is ka.TaskState.SUCCEEDED


async def test_unknown_task_is_not_found() -> None:
    async with FakeKlingServer() as server, kling_client(server) as client:
        with pytest.raises(ka.NotFoundError):
            await client.get_task("999999999999999999")


async def test_connection_refused_is_a_connect_error() -> None:
    async with FakeKlingServer() as server:
        url = server.url
    # The server is closed now: nothing listens on its port.
    retry = ka.RetryPolicy(max_attempts=2, base_delay=0.001, max_delay=0.001)
    async with ka.KlingClient.kling(api_key=API_KEY, base_url=url, retry=retry) as client:
        with pytest.raises(ka.ConnectError):
            await client.get_task("1")


async def test_apimodels_submit_runs_identify_face_first() -> None:
    async with FakeKlingServer(task_duration=0.02) as server, apimodels_client(server) as client:
        snap = await client.submit(
            ka.LipSyncJob.from_audio(video_url="https://e.com/v.mp4", audio_file=WAV)
        )
        done = await wait_terminal(client, snap.task_id)
    assert done.state is ka.TaskState.SUCCEEDED
    assert server.requests["apimodels-submit"] == 2
    assert server.tasks[snap.task_id].stage == "advanced-lip-sync"


async def test_apimodels_refuses_text_jobs_before_any_request() -> None:
    async with FakeKlingServer() as server, apimodels_client(server) as client:
        with pytest.raises(ka.ValidationError) as info:
            await client.submit(text_job(1))
    assert info.value.field == "text"
    assert requests_sent(server) == 0


async def test_caller_owned_session_is_left_open() -> None:
    async with FakeKlingServer(task_duration=0.01) as server, aiohttp.ClientSession() as session:
        async with kling_client(server, session=session) as client:
            await client.submit(text_job(1))
        assert not session.closed


async def test_secrets_stay_out_of_reprs_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="kling_async")
    async with FakeKlingServer(task_duration=0.01) as server:
        client = jwt_client(server)
        async with client:
            await client.submit(text_job(1))
        text = repr(client) + repr(client._requester.transport._credentials) + caplog.text
    assert "sk-sandbox-secret-for-hs256-tokens" not in text and "ak-sandbox" not in text
    assert "Bearer" not in caplog.text
    assert "POST" in caplog.text  # the DEBUG line per request exists


def test_credentials_are_validated() -> None:
    with pytest.raises(ka.ValidationError, match="access_key"):
        ka.KlingClient.kling(access_key="only-half")
    with pytest.raises(ka.ValidationError, match="api_key"):
        ka.KlingClient.kling(api_key="k", access_key="a", secret_key="s")
    with pytest.raises(ka.ValidationError, match="api_key"):
        ka.KlingClient.dmxapi(api_key="bad\nkey")
    with pytest.raises(ka.ValidationError, match="base_url"):
        ka.KlingClient.dmxapi(api_key="k", base_url="ftp://x")
    with pytest.raises(ka.ValidationError, match="max_in_flight"):
        ka.KlingClient.dmxapi(api_key="k", max_in_flight=0)


async def test_errors_raised_inside_the_client_block_come_out_unwrapped() -> None:
    async with FakeKlingServer() as server:
        client = ka.KlingClient.kling(api_key="sk-wrong", base_url=server.url, retry=FAST_RETRY)

        async def run_inside_the_client() -> None:
            async with client:
                async for _ in client.run_batch([text_job(1)]):
                    pass

        async def raise_inside_the_client() -> None:
            async with kling_client(server):
                raise KeyError("mine")

        with pytest.raises(ka.AuthenticationError):
            await run_inside_the_client()
        with pytest.raises(KeyError):
            await raise_inside_the_client()


async def test_a_refused_token_is_reminted_and_retried_once() -> None:
    # The official API now and then refuses a correct token ("signature invalid", 1004):
    # a fresh JWT and one retry fix it (docs/protocol.md, JWT auth).
    async with FakeKlingServer(task_duration=0.01) as server:
        client = jwt_client(server, retry=ka.RetryPolicy(max_attempts=1))
        async with client:
            server.script("submit", status=401, code=1004, message="signature invalid")
            snap = await client.submit(text_job(1))
            assert snap.task_id in server.tasks
            server.script("query", status=401, code=1004, message="signature invalid", times=2)
            with pytest.raises(ka.AuthenticationError):
                await client.get_task(snap.task_id)  # a second refusal in a row is final
    assert server.requests["submit"] == 2
    assert server.requests["query"] == 2
    assert server.tasks_created == 1


async def test_a_clock_ahead_of_the_servers_is_cured_by_the_reminted_token() -> None:
    """Our clock 20 s ahead of the server's: the token's ``nbf`` (now - 5 s) lies in the server's
    future, 1003 "not yet valid".  The refused token was "re-minted" in the same second into the
    very same bytes, refused again, and the AuthenticationError stopped every batch at its first
    request.  A token minted after a refusal dates ``nbf`` back further: it differs, and it holds.
    """
    import time

    async with FakeKlingServer(task_duration=0.01) as server:
        client = jwt_client(
            server, retry=ka.RetryPolicy(max_attempts=1), clock=lambda: time.time() + 20
        )
        async with client:
            snap = await client.submit(text_job(1))
            done = await wait_terminal(client, snap.task_id)
    assert done.state is ka.TaskState.SUCCEEDED
    assert server.requests["submit"] == 2  # refused once (1003), then accepted
    assert server.tasks_created == 1


def test_a_token_minted_after_a_refusal_differs_and_dates_nbf_back() -> None:
    import jwt

    from kling_async._auth import KlingJwt

    minter = KlingJwt("ak-sandbox", "sk-sandbox-secret-for-hs256-tokens")
    first = minter.authorization(1_781_080_794.2)
    assert minter.authorization(1_781_080_794.9) == first  # cached
    assert minter.refresh() is True
    second = minter.authorization(1_781_080_794.9)  # the same second
    assert second != first
    claims = [
        jwt.decode(token.split()[1], options={"verify_signature": False})
        for token in (first, second)
    ]
    assert claims[0] == {"iss": "ak-sandbox", "exp": 1_781_082_594, "nbf": 1_781_080_789}
    assert claims[1] == {"iss": "ak-sandbox", "exp": 1_781_082_594, "nbf": 1_781_080_494}


async def test_a_static_key_refusal_is_not_retried() -> None:
    async with FakeKlingServer() as server, kling_client(server) as client:
        server.script("submit", status=401, code=1004, message="token expired")
        with pytest.raises(ka.AuthenticationError):
            await client.submit(text_job(1))
    assert server.requests["submit"] == 1


async def test_api_calls_are_bounded_by_total_not_by_the_read_time_out() -> None:
    # `read` (the longest silence between reads) is for downloads; an API answer, small JSON, is
    # bounded by `total`: a slow answer inside it arrives, a server that stalls fails.
    slow = ka.Timeouts(connect=1.0, read=0.05, total=1.0)
    async with FakeKlingServer(faults=FaultPlan(answer_delay=0.15)) as server:
        async with kling_client(server, timeouts=slow) as client:
            snap = await client.submit(text_job(1))
        assert snap.task_id in server.tasks
        server.faults = FaultPlan(answer_delay=30.0)
        async with kling_client(server, timeouts=ka.Timeouts(total=0.3)) as client:
            with anyio.fail_after(3), pytest.raises(ka.TransportTimeout):
                await client.submit(text_job(2))


@pytest.mark.parametrize("field", ["connect", "read", "total"])
@pytest.mark.parametrize("value", [0, -1, math.inf, math.nan, "5", None, True])
def test_timeouts_refuse_what_is_not_a_positive_number(field: str, value: object) -> None:
    with pytest.raises(ka.ValidationError) as info:
        ka.Timeouts(**{field: value})  # type: ignore[arg-type]
    assert info.value.field == field


def test_timeouts_must_be_a_timeouts_record() -> None:
    assert ka.Timeouts(connect=2, read=3, total=4).total == 4
    with pytest.raises(ka.ValidationError) as info:
        ka.KlingClient.kling(api_key="k", timeouts=30)  # type: ignore[arg-type]
    assert info.value.field == "timeouts"
