"""``/healthz`` and ``/readyz`` turning bad when they should, and only then: ``/healthz`` fails
when the event loop stops beating; ``/readyz`` fails once export has been failing longer than
the grace period (an outage, a refused credential) and comes back on the next success; the
Collector refusing one request's data (HTTP 400/413, gRPC INVALID_ARGUMENT) is not an export
failure and never makes the agent unready. In-process servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import grpc
import pytest

from receiver.config import EbpfConfig, RetryConfig
from receiver.export import OtlpExporter
from receiver.model import Signal
from receiver.telemetry import ExportHealth, SelfTelemetry, TelemetryServer

from .test_exporter import RESOURCE, FakeTraceServer, Step, span, value
from .test_fault_suite import FakeHttpServer, Fault, config

GRACE = 0.3
RETRY = RetryConfig(initial_interval=0.05, max_interval=0.1, max_elapsed_time=30.0,
                    randomization_factor=0.1)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


# --------------------------------------------------------------------------- /healthz

def test_healthz_fails_when_the_heartbeat_stops_and_recovers_with_it() -> None:
    srv = TelemetryServer(SelfTelemetry(), "127.0.0.1", 0, heartbeat_timeout=10.0)
    srv.start()
    try:
        url = f"http://127.0.0.1:{srv.port}/healthz"
        srv.beat()
        assert get(url) == (200, "ok\n")
        srv._last_beat -= 11.0   # the last beat 11 s ago, without waiting for it
        code, body = get(url)
        assert code == 503 and body.startswith("event loop stalled for "), (code, body)
        srv.beat()
        assert get(url) == (200, "ok\n")
    finally:
        srv.stop()


def test_a_blocked_event_loop_shows_on_the_services_healthz() -> None:
    """The service's own heartbeat task (one beat a second) keeps /healthz at 200 while the
    loop runs (heartbeat_timeout 2.5 s: 1.5 s of margin for a loaded runner); a loop blocked
    for longer turns it 503, seen from another thread as a kubelet would; once unblocked it is
    200 again."""
    from receiver.service import Service

    service = Service(EbpfConfig.from_dict({}, environ={}), least_privilege=False)
    service.http = TelemetryServer(service.telemetry, "127.0.0.1", 0, heartbeat_timeout=2.5)
    service.http.start()
    url = f"http://127.0.0.1:{service.http.port}/healthz"
    seen_while_blocked: list[int] = []

    def poll(stop: threading.Event) -> None:
        while not stop.is_set():
            seen_while_blocked.append(get(url)[0])
            time.sleep(0.1)

    async def main() -> tuple[int, int]:
        beat = asyncio.get_running_loop().create_task(service._beat())
        try:
            await asyncio.sleep(2.7)    # past heartbeat_timeout: only the beats keep it healthy
            before = (await asyncio.to_thread(get, url))[0]
            stop = threading.Event()
            poller = threading.Thread(target=poll, args=(stop,))
            poller.start()
            time.sleep(3.5)             # blocks the event loop: no beats
            stop.set()
            poller.join()
            await asyncio.sleep(0.1)    # the heartbeat task runs again
            after = (await asyncio.to_thread(get, url))[0]
            return before, after
        finally:
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)

    try:
        before, after = asyncio.run(main())
    finally:
        service.http.stop()
    assert before == 200
    assert 503 in seen_while_blocked, seen_while_blocked
    assert after == 200


# --------------------------------------------------------------------------- /readyz

async def always(transport: str, answer: Any) -> Any:
    """A fake server answering every request with ``answer`` (a gRPC code or an HTTP status)
    until its ``faults``/``steps`` are cleared."""
    if transport == "http":
        return await FakeHttpServer(faults=[Fault(http_status=answer) for _ in range(10000)]).start()
    return await FakeTraceServer(steps=[Step(answer) for _ in range(10000)]).start()


def clear(srv: Any) -> None:
    (srv.faults if isinstance(srv, FakeHttpServer) else srv.steps).clear()


async def poll_readyz(url: str, want: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        code, body = await asyncio.to_thread(get, url)
        if code == want:
            return body
        assert time.monotonic() < deadline, f"/readyz still {code} {body!r}, wanted {want}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize(("transport", "answer", "label"), [
    ("grpc", grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE"),
    ("http", 503, "503"),
    ("grpc", grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"),
    ("http", 401, "401"),
])
def test_readyz_fails_while_export_fails_and_recovers(transport: str, answer: Any, label: str) -> None:
    """An outage (retried) or a refused credential (permanent, every request): not ready after
    the grace period, naming the last status; ready again at the next accepted request."""
    telemetry = SelfTelemetry()
    http = TelemetryServer(telemetry, "127.0.0.1", 0, readiness_grace=GRACE)
    http.start()
    http.ready = True
    url = f"http://127.0.0.1:{http.port}/readyz"

    async def main() -> str:
        srv = await always(transport, answer)
        exp = OtlpExporter(config(transport, srv.port, retry=RETRY, timeout=1.0), telemetry)
        try:
            await exp.start()
            assert (await asyncio.to_thread(get, url))[0] == 200
            for i in range(200):
                exp.submit(Signal.TRACES, RESOURCE, span(f"down{i}"))
                if (await asyncio.to_thread(get, url))[0] == 503:
                    break
                await asyncio.sleep(0.05)
            body = await poll_readyz(url, 503, 1)
            clear(srv)
            assert exp.submit(Signal.TRACES, RESOURCE, span("back"))
            await poll_readyz(url, 200, 10)
            await asyncio.wait_for(exp.flush(), 20)
        finally:
            await exp.shutdown()
            await srv.stop()
        return body

    try:
        body = asyncio.run(main())
    finally:
        http.stop()
    assert body.startswith("not ready: export to the Collector failing for "), body
    assert f"(last status {label})" in body, body
    assert value(telemetry, "sent_items", signal="traces") >= 1


@pytest.mark.parametrize(("transport", "answer", "label"), [
    ("grpc", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    ("http", 400, "400"),
    ("http", 413, "413"),
])
def test_bad_data_rejections_never_make_the_agent_unready(transport: str, answer: Any, label: str) -> None:
    """Every request refused for its data, over several grace periods: still ready."""
    telemetry = SelfTelemetry()
    http = TelemetryServer(telemetry, "127.0.0.1", 0, readiness_grace=GRACE)
    http.start()
    http.ready = True
    url = f"http://127.0.0.1:{http.port}/readyz"

    async def main() -> list[int]:
        srv = await always(transport, answer)
        exp = OtlpExporter(config(transport, srv.port, retry=RETRY), telemetry)
        codes = []
        try:
            await exp.start()
            t0 = time.monotonic()
            i = 0
            while i < 5 or time.monotonic() - t0 < 3 * GRACE:   # a slow runner: 5 still
                assert exp.submit(Signal.TRACES, RESOURCE, span(f"bad{i}"))
                i += 1
                await asyncio.wait_for(exp.flush(), 20)
                codes.append((await asyncio.to_thread(get, url))[0])
                await asyncio.sleep(0.05)
        finally:
            await exp.shutdown()
            await srv.stop()
        return codes

    try:
        codes = asyncio.run(main())
    finally:
        http.stop()
    rejected = value(telemetry, "requests", signal="traces", status=label)
    assert rejected >= 4 and rejected == len(codes)
    assert value(telemetry, "dropped_items", signal="traces", reason="permanent_error") == rejected
    assert set(codes) == {200}, codes
    assert telemetry.export_health.failing_since is None


def test_a_bad_data_rejection_during_an_outage_neither_ends_nor_starts_it() -> None:
    now = [100.0]
    health = ExportHealth(clock=lambda: now[0])
    health.record("400")
    assert health.failing_for() == 0.0
    health.record("UNAVAILABLE")
    now[0] = 105.0
    health.record("INVALID_ARGUMENT")   # one request's data: says nothing about the outage
    now[0] = 110.0
    assert health.failing_for() == 10.0
    assert health.last_failure == "UNAVAILABLE"
    health.record("200")
    assert health.failing_for() == 0.0
