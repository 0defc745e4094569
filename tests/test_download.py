"""client.download against real servers: the fake server's /videos/ route and small aiohttp hosts
written here for what a CDN may do (ignore Range, drop the connection, lie about sizes, 404)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import anyio
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from helpers import FAST_RETRY, kling_client, text_job
from hypothesis import given
from hypothesis import strategies as st

import kling_async as ka
from kling_async._download import MAX_NAME_BYTES, file_name, safe_filename
from kling_async.testing import FakeKlingServer, video_bytes

#: 300 KiB of bytes that differ along the file, so a misplaced range shows.
BODY = bytes((i * 7 + i // 251) % 256 for i in range(300 * 1024))

Handler = Callable[[web.Request, int], Awaitable[web.StreamResponse]]


class VideoHost:
    """A CDN stand-in: ``handler(request, n)`` answers the n-th request (from 0)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.headers: list[dict[str, str]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.server: TestServer | None = None

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        self.headers.append(dict(request.headers))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            return await self.handler(request, len(self.headers) - 1)
        finally:
            self.in_flight -= 1

    def url(self, name: str = "clip.mp4", query: str = "") -> str:
        assert self.server is not None
        url = str(self.server.make_url(f"/v/{name}"))
        return f"{url}?{query}" if query else url


HostFactory = Callable[[Handler], Awaitable[VideoHost]]


@pytest.fixture
async def host_factory() -> AsyncIterator[HostFactory]:
    servers: list[TestServer] = []

    async def make(handler: Handler) -> VideoHost:
        host = VideoHost(handler)
        app = web.Application()
        app.router.add_get("/v/{name}", host._serve)
        host.server = TestServer(app)
        await host.server.start_server()
        servers.append(host.server)
        return host

    yield make
    for server in servers:
        await server.close()


@pytest.fixture
async def client() -> AsyncIterator[ka.KlingClient]:
    # The API itself is never contacted by a download: any base URL will do.
    async with ka.KlingClient.kling(
        api_key="sk-secret-key-never-sent", base_url="http://127.0.0.1:9", retry=FAST_RETRY
    ) as client:
        yield client


def done(url: str, task_id: str = "task-1") -> ka.TaskSnapshot:
    return ka.TaskSnapshot(task_id=task_id, state=ka.TaskState.SUCCEEDED, video_urls=(url,))


def result(url: str, key: str, task_id: str = "task-1") -> ka.JobResult:
    return ka.JobResult(key=key, task_id=task_id, state=ka.TaskState.SUCCEEDED, video_urls=(url,))


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def contents(directory: Path) -> set[bytes]:
    return {p.read_bytes() for p in directory.iterdir()}


def start_of(request: web.Request) -> int:
    if "Range" not in request.headers:
        return 0
    return request.http_range.start or 0


async def whole(request: web.Request, n: int) -> web.StreamResponse:
    """A well-behaved host: the body, or the range asked for."""
    start = start_of(request)
    if not start:
        return web.Response(body=BODY, content_type="video/mp4")
    headers = {"Content-Range": f"bytes {start}-{len(BODY) - 1}/{len(BODY)}"}
    return web.Response(status=206, body=BODY[start:], headers=headers)


async def cut(
    request: web.Request, body: bytes, at: int, *, status: int = 200
) -> web.StreamResponse:
    """Announce ``body`` whole, send ``at`` bytes of it, then drop the connection."""
    response = web.StreamResponse(status=status, headers={"Content-Length": str(len(body))})
    if status == 206:
        start = start_of(request)
        response.headers["Content-Range"] = f"bytes {start}-{start + len(body) - 1}/{len(BODY)}"
    await response.prepare(request)
    await response.write(body[:at])
    assert request.transport is not None
    request.transport.close()
    return response


pytestmark = pytest.mark.anyio


# -- the fake server's videos -------------------------------------------------------------------


async def test_batch_results_saved_under_their_keys(tmp_path: Path) -> None:
    async with FakeKlingServer(task_duration=0.02) as server:
        async with kling_client(server) as client:
            jobs = [text_job(n, key=f"ep1/line {n}") for n in range(6)]
            results = [r async for r in client.run_batch(jobs)]
            paths = [await client.download(r, tmp_path / "out") for r in results]
    for r, path in zip(results, paths, strict=True):
        assert r.task_id is not None
        assert path.parent == tmp_path / "out"
        assert path.name == r.key.replace("/", "_") + ".mp4"
        assert path.read_bytes() == video_bytes(r.task_id)
    assert server.requests["download"] == 6
    assert listing(tmp_path / "out") == sorted(p.name for p in paths)  # no .part left over


async def test_snapshot_named_by_task_id_and_explicit_filename(tmp_path: Path) -> None:
    async with FakeKlingServer(task_duration=0.02) as server:
        async with kling_client(server) as client:
            [r] = [r async for r in client.run_batch([text_job(1)])]
            assert r.task_id is not None
            snapshot = await client.get_task(r.task_id)
            by_id = await client.download(snapshot, tmp_path)
            named = await client.download(r, tmp_path, filename="final cut")
            named_ext = await client.download(r, tmp_path, filename="x.mov")
    assert by_id.name == f"{r.task_id}.mp4"
    assert named.name == "final cut.mp4"
    assert named_ext.name == "x.mov"
    assert by_id.read_bytes() == named.read_bytes() == video_bytes(r.task_id)


async def test_results_without_a_video_are_refused(client: ka.KlingClient, tmp_path: Path) -> None:
    failed = ka.JobResult(key="a", task_id="t", state=ka.TaskState.FAILED)
    with pytest.raises(ka.ValidationError, match="result"):
        await client.download(failed, tmp_path)
    with pytest.raises(ka.ValidationError, match="filename"):
        await client.download(result("http://127.0.0.1:9/v.mp4", "a"), tmp_path, filename="../")
    with pytest.raises(ka.DownloadError, match="http"):
        await client.download(result("file:///etc/passwd", "a"), tmp_path)
    assert listing(tmp_path) == []


# -- what CDNs do -------------------------------------------------------------------------------


async def test_no_authorization_sent_to_the_video_host(
    host_factory: HostFactory, tmp_path: Path
) -> None:
    host = await host_factory(whole)
    for client in (
        ka.KlingClient.kling(api_key="sk-secret", base_url="http://127.0.0.1:9"),
        ka.KlingClient.kling(access_key="ak", secret_key="s" * 32, base_url="http://127.0.0.1:9"),
    ):
        async with client:
            await client.download(result(host.url(), key=f"k{len(host.headers)}"), tmp_path)
    assert len(host.headers) == 2
    for headers in host.headers:
        assert "Authorization" not in headers
        assert not any("secret" in value or "Bearer" in value for value in headers.values())


async def test_a_callers_session_credentials_stay_off_the_video_host(
    host_factory: HostFactory, tmp_path: Path
) -> None:
    # A caller's session set up for some other API, with its own Authorization and cookie: the
    # client uses it for API calls as it is, but videos must not receive those credentials.
    host = await host_factory(whole)
    defaults = {"Authorization": "Bearer callers-own-token", "Cookie": "sid=callers-cookie"}
    async with FakeKlingServer(task_duration=0.01) as server:
        async with aiohttp.ClientSession(headers=defaults) as session:
            async with kling_client(server, session=session) as client:
                task = await client.submit(text_job(1))
                await client.download(result(host.url(), key="k"), tmp_path)
            assert not session.closed  # still the caller's to close
    assert task.task_id in server.tasks  # the API calls went through the caller's session
    assert listing(tmp_path) == ["k.mp4"]
    (headers,) = host.headers
    assert "Authorization" not in headers and "Cookie" not in headers
    assert not any("callers" in value for value in headers.values())


async def test_a_plain_callers_session_fetches_the_videos_too(
    host_factory: HostFactory, tmp_path: Path
) -> None:
    host = await host_factory(whole)
    async with aiohttp.ClientSession(headers={"X-Trace": "plain"}) as session:
        client = ka.KlingClient.kling(
            api_key="sk-x", base_url="http://127.0.0.1:9", session=session
        )
        async with client:
            await client.download(result(host.url(), key="k"), tmp_path)
    (headers,) = host.headers
    assert headers.get("X-Trace") == "plain"  # no credentials: the caller's session was used


async def test_dropped_connection_resumes_with_range(
    host_factory: HostFactory, client: ka.KlingClient, tmp_path: Path
) -> None:
    async def handler(request: web.Request, n: int) -> web.StreamResponse:
        if n == 0:
            return await cut(request, BODY, 100_000)
        return await whole(request, n)

    host = await host_factory(handler)
    path = await client.download(result(host.url(), "resumed"), tmp_path)
    assert path.read_bytes() == BODY
    assert len(host.headers) == 2
    assert "Range" not in host.headers[0]
    resumed_at = int(host.headers[1]["Range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= 100_000  # only the missing tail was asked for again
    assert listing(tmp_path) == ["resumed.mp4"]


async def test_range_ignored_restarts_from_zero(
    host_factory: HostFactory, client: ka.KlingClient, tmp_path: Path
) -> None:
    async def handler(request: web.Request, n: int) -> web.StreamResponse:
        if n == 0:
            return await cut(request, BODY, 150_000)
        return web.Response(body=BODY)  # 200 and the whole body, whatever the Range said

    host = await host_factory(handler)
    path = await client.download(result(host.url(), "again"), tmp_path)
    assert path.read_bytes() == BODY  # not the first part twice
    assert "Range" in host.headers[1]
    assert len(host.headers) == 2  # the 200 was taken from its start, not refused


async def test_misplaced_range_restarts_without_ranges(
    host_factory: HostFactory, client: ka.KlingClient, tmp_path: Path
) -> None:
    async def handler(request: web.Request, n: int) -> web.StreamResponse:
        if n == 0:
            return await cut(request, BODY, 120_000)
        if n == 1:  # a 206 for bytes we did not ask for
            headers = {"Content-Range": f"bytes 10-{len(BODY) - 1}/{len(BODY)}"}
            return web.Response(status=206, body=BODY[10:], headers=headers)
        return await whole(request, n)

    host = await host_factory(handler)
    path = await client.download(result(host.url(), "fixed"), tmp_path)
    assert path.read_bytes() == BODY
    assert len(host.headers) == 3 and "Range" not in host.headers[2]


async def test_size_that_never_matches_fails_cleanly(
    host_factory: HostFactory, client: ka.KlingClient, tmp_path: Path
) -> None:
    async def handler(request: web.Request, n: int) -> web.StreamResponse:
        # Always "the first half of a file twice as long", whatever was asked.
        half = BODY[: len(BODY) // 2]
        headers = {"Content-Range": f"bytes 0-{len(half) - 1}/{len(BODY)}"}
        return web.Response(status=206, body=half, headers=headers)

    host = await host_factory(handler)
    with pytest.raises(ka.DownloadError) as caught:
        await client.download(result(host.url(), "short"), tmp_path)
    assert caught.value.retryable
    assert len(host.headers) == FAST_RETRY.max_attempts
    assert listing(tmp_path) == []  # neither a partial file nor a temporary one


async def test_too_many_bytes_is_a_size_mismatch(
    host_factory: HostFactory, client: ka.KlingClient, tmp_path: Path
) -> None:
    async def handler(request: web.Request, n: int) -> web.StreamResponse:
        headers = {"Content-Range": "bytes 0-999/1000"}
        return web.Response(status=206, body=BODY[:5000], headers=headers)

    host = await host_factory(handler)
    with pytest.raises(ka.DownloadError, match="more bytes"):
        await client.download(result(host.url(), "long"), tmp_path)
    assert listing(tmp_path) == []


async def test_a_resume_answered_from_a_file_of_another_size_starts_over(
    host_factory: HostFactory, client: ka.KlingClient, tmp_path: Path
) -> None:
    # The host's file changed between the attempts: its tail does not go after our bytes.
    other = bytes(reversed(BODY)) + b"longer"

    async def handler(request: web.Request, n: int) -> web.StreamResponse:
        if n == 0:
            return await cut(request, BODY, 100_000)
        start = start_of(request)
        headers = {"Content-Range": f"bytes {start}-{len(other) - 1}/{len(other)}"}
        return web.Response(status=206, body=other[start:], headers=headers)

    host = await host_factory(handler)
    path = await client.download(result(host.url(), "changed"), tmp_path)
    assert path.read_bytes() == other  # the new file whole, not two files spliced
    assert "Range" not in host.headers[-1]


async def test_an_empty_body_is_no_video(
    host_factory: HostFactory, client: ka.KlingClient, tmp_path: Path
) -> None:
    async def handler(request: web.Request, n: int) -> web.StreamResponse:
        if n == 0:
            return web.Response(body=b"", content_type="video/mp4")  # Content-Length: 0
        return await whole(request, n)

    host = await host_factory(handler)
    path = await client.download(result(host.url(), "late"), tmp_path)
    assert path.read_bytes() == BODY and len(host.headers) == 2
    always = await host_factory(lambda request, n: handler(request, 0))
    with pytest.raises(ka.DownloadError, match="empty body") as caught:
        await client.download(result(always.url(), "never"), tmp_path)
    assert caught.value.retryable and listing(tmp_path) == ["late.mp4"]
    assert len(always.headers) == FAST_RETRY.max_attempts


async def test_expired_url_is_not_retried(
    host_factory: HostFactory, client: ka.KlingClient, tmp_path: Path
) -> None:
    async def handler(request: web.Request, n: int) -> web.StreamResponse:
        return web.Response(status=404, text="NoSuchKey")

    host = await host_factory(handler)
    with pytest.raises(ka.DownloadError) as caught:
        await client.download(result(host.url(query="X-Signature=abc123"), "gone"), tmp_path)
    error = caught.value
    assert error.status == 404 and not error.retryable
    assert "expired" in str(error)
    assert "abc123" not in str(error) and "abc123" not in error.url  # signatures stay secret
    assert len(host.headers) == 1
    assert listing(tmp_path) == []


async def test_server_errors_are_retried(
    host_factory: HostFactory, client: ka.KlingClient, tmp_path: Path
) -> None:
    async def handler(request: web.Request, n: int) -> web.StreamResponse:
        if n < 2:
            return web.Response(status=503, headers={"Retry-After": "0"})
        return await whole(request, n)

    host = await host_factory(handler)
    path = await client.download(result(host.url(), "flaky"), tmp_path)
    assert path.read_bytes() == BODY and len(host.headers) == 3


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file-size limit")
async def test_a_full_disk_is_one_line_naming_the_folder_and_leaves_no_partial_file(
    host_factory: HostFactory, tmp_path: Path
) -> None:
    async def trickle(request: web.Request, n: int) -> web.StreamResponse:
        # Small pieces, as a slow link brings them: the write that fails is a buffered one.
        response = web.StreamResponse(headers={"Content-Length": str(len(BODY))})
        await response.prepare(request)
        for start in range(0, len(BODY), 1000):
            await response.write(BODY[start : start + 1000])
            await anyio.sleep(0.001)
        return response

    host = await host_factory(trickle)
    folder = tmp_path / "videos"
    folder.mkdir()
    # The disk "fills up" 100 kB into the video (past the first 64 KiB, written at once).
    worker = Path(__file__).with_name("limited_download.py")
    done = await anyio.run_process(
        [sys.executable, str(worker), host.url(), str(folder), "100000"], check=False
    )
    assert done.returncode == 0, done.stderr.decode()
    outcome = json.loads(done.stdout)
    assert outcome["error_type"] == "LocalWriteError"
    assert outcome["error"] == f"cannot save t1.mp4 in {folder}: File too large"
    assert listing(folder) == []  # the space the partial file took is given back


async def test_downloads_at_once_are_bounded(host_factory: HostFactory, tmp_path: Path) -> None:
    async def handler(request: web.Request, n: int) -> web.StreamResponse:
        await anyio.sleep(0.05)
        return web.Response(body=BODY[: 1000 + n])

    host = await host_factory(handler)
    async with ka.KlingClient.kling(
        api_key="sk", base_url="http://127.0.0.1:9", max_downloads=2
    ) as client:
        async with anyio.create_task_group() as group:
            for n in range(6):
                group.start_soon(client.download, result(host.url(f"{n}.mp4"), f"v{n}"), tmp_path)
    assert host.most_in_flight == 2
    assert len(listing(tmp_path)) == 6
    with pytest.raises(ka.ValidationError, match="max_downloads"):
        ka.KlingClient.kling(api_key="sk", max_downloads=0)


async def test_cancelled_download_leaves_nothing(
    host_factory: HostFactory, client: ka.KlingClient, tmp_path: Path
) -> None:
    async def handler(request: web.Request, n: int) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(len(BODY))})
        await response.prepare(request)
        await response.write(BODY[:1000])
        await anyio.sleep(5)
        return response

    host = await host_factory(handler)
    with anyio.move_on_after(0.2):
        await client.download(result(host.url(), "stalled"), tmp_path)
    assert listing(tmp_path) == []


# -- names and clobbering -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("../../etc/passwd", "_._etc_passwd.mp4"),
        ("a/b", "a_b.mp4"),
        ("a\\b", "a_b.mp4"),
        ("con", "_con.mp4"),
        ("NUL.txt", "_NUL.txt.mp4"),
        ("Привет, мир 你好", "Привет, мир 你好.mp4"),
        ("e\u0301te\u0301", "\u00e9t\u00e9.mp4"),  # NFC: one code point per letter
        ("line\x00one\ntwo", "line_one_two.mp4"),
        ("evil\u202egpj.exe", "evil_gpj.exe.mp4"),  # no right-to-left override
        ('a:b*c?d"e<f>g|h', "a_b_c_d_e_f_g_h.mp4"),
        ("  .hidden. ", "hidden.mp4"),
        ("clip.mp4", "clip.mp4"),
        ("", "task-9.mp4"),
        ("...", "task-9.mp4"),
        ("/", "task-9.mp4"),
        ("\x00", "task-9.mp4"),
    ],
)
def test_file_names_from_keys(key: str, expected: str) -> None:
    assert file_name("https://cdn.example/x/v.mp4?sig=1", key=key, task_id="task-9") == expected


def test_file_name_fallbacks_and_extensions() -> None:
    assert file_name("https://cdn.example/v.MOV", key="k") == "k.mov"
    assert file_name("https://cdn.example/v.php", key="k") == "k.mp4"
    assert file_name("https://cdn.example/v", key="..", task_id="../..") == "video.mp4"
    long = file_name("https://cdn.example/v.mp4", key="ж" * 500)
    assert len(long.encode()) <= MAX_NAME_BYTES + len(".mp4")
    assert long == "ж" * (MAX_NAME_BYTES // 2) + ".mp4"


@given(st.text(max_size=400))
def test_safe_filename_never_escapes(raw: str) -> None:
    name = safe_filename(raw)
    assert len(name.encode("utf-8")) <= MAX_NAME_BYTES
    assert "/" not in name and "\\" not in name and ".." not in name
    assert not name.startswith((".", " ")) and not name.endswith((".", " "))
    assert all(ord(ch) >= 32 and ch != "\x7f" for ch in name)
    assert safe_filename(name) == name  # already safe: unchanged
    if name:
        base = Path("/srv/videos")
        assert os.path.normpath(base / name).startswith(f"{base}/")


async def test_traversal_key_stays_in_the_directory(
    host_factory: HostFactory, client: ka.KlingClient, tmp_path: Path
) -> None:
    host = await host_factory(whole)
    target = tmp_path / "a" / "b"
    path = await client.download(result(host.url(), "../../escape"), target)
    assert path.parent == target
    assert listing(tmp_path) == ["a"] and listing(tmp_path / "a") == ["b"]


async def test_existing_different_file_is_never_clobbered(
    host_factory: HostFactory, client: ka.KlingClient, tmp_path: Path
) -> None:
    host = await host_factory(whole)
    (tmp_path / "take.mp4").write_bytes(b"someone else's video")
    # Same size, other bytes (from the start: a file of the same size and the same first 64 KiB
    # is taken for the same video, as documented).
    other = bytes([BODY[0] ^ 0xFF]) + BODY[1:]
    (tmp_path / "take-1.mp4").write_bytes(other)
    path = await client.download(result(host.url(), "take"), tmp_path)
    assert path.name == "take-2.mp4" and path.read_bytes() == BODY
    assert (tmp_path / "take.mp4").read_bytes() == b"someone else's video"
    assert (tmp_path / "take-1.mp4").read_bytes() == other


async def test_same_video_already_there_is_returned(
    host_factory: HostFactory, client: ka.KlingClient, tmp_path: Path
) -> None:
    host = await host_factory(whole)
    first = await client.download(result(host.url(), "once"), tmp_path)
    before = first.stat().st_mtime_ns
    again = await client.download(result(host.url(), "once"), tmp_path)
    assert again == first and first.stat().st_mtime_ns == before
    assert listing(tmp_path) == ["once.mp4"]


async def test_same_name_at_once_gets_two_files(
    host_factory: HostFactory, client: ka.KlingClient, tmp_path: Path
) -> None:
    async def handler(request: web.Request, n: int) -> web.StreamResponse:
        await anyio.sleep(0.02)
        return web.Response(body=request.match_info["name"].encode() * 1000)

    host = await host_factory(handler)
    async with anyio.create_task_group() as group:
        for n in range(4):
            # "a/b" and "a_b" both make "a_b.mp4".
            key = "a/b" if n % 2 else "a_b"
            group.start_soon(client.download, result(host.url(f"src{n}"), key), tmp_path)
    assert listing(tmp_path) == ["a_b-1.mp4", "a_b-2.mp4", "a_b-3.mp4", "a_b.mp4"]
    assert contents(tmp_path) == {f"src{n}".encode() * 1000 for n in range(4)}
