"""Tests of the fake Sekoia intake used by the end-to-end tests (tests/fake_intake.py)."""

from __future__ import annotations

import base64
import gzip
import ssl
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import orjson
import pytest

from devtools.probe import wait_until
from tests.fake_intake import (
    MAX_EVENT_BYTES,
    VALID_KEY,
    FakeIntake,
    Received,
    fake_intake_factory,
)

KEY_HEADER = {"X-SEKOIAIO-INTAKE-KEY": VALID_KEY}
PREFIX = "/api/v1/intake-http"


@pytest.fixture
def intake() -> Iterator[FakeIntake]:
    with FakeIntake() as fi:
        yield fi


@pytest.fixture
def client(intake: FakeIntake) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=intake.url, verify=intake.client_ssl_context(), timeout=10) as c:
        yield c


def _is_uuid4(value: str) -> bool:
    return uuid.UUID(value).version == 4


# -- endpoints ----------------------------------------------------------------------------------


def test_url_and_ca(intake: FakeIntake) -> None:
    assert intake.url == f"https://127.0.0.1:{intake.port}"
    assert intake.port > 0
    with open(intake.ca_file) as f:
        assert "BEGIN CERTIFICATE" in f.read()
    # The CA file is what the forwarder's intake.ca_file points at.
    with httpx.Client(verify=ssl.create_default_context(cafile=intake.ca_file)) as c:
        assert c.post(intake.url + "/plain", content=b"x", headers=KEY_HEADER).status_code == 200
    # "localhost" is in the certificate as well.
    url = intake.url.replace("127.0.0.1", "localhost") + "/plain"
    with httpx.Client(verify=intake.client_ssl_context()) as c:
        assert c.post(url, content=b"y", headers=KEY_HEADER).status_code == 200


def test_untrusted_without_ca(intake: FakeIntake) -> None:
    with httpx.Client() as c, pytest.raises(httpx.ConnectError):
        c.post(intake.url + "/plain", content=b"x", headers=KEY_HEADER)
    assert intake.events == []


def test_plain(intake: FakeIntake, client: httpx.Client) -> None:
    r = client.post("/plain", content="1.2.3.4:5 [x] é\n".encode(), headers=KEY_HEADER)
    assert r.status_code == 200
    assert _is_uuid4(r.json()["event_id"])
    assert intake.events == [Received("1.2.3.4:5 [x] é\n", None, "/plain", 0)]
    req = intake.requests[0]
    assert req["path"] == "/plain"
    assert req["endpoint"] == "/plain"
    assert req["status"] == 200
    assert req["n_events"] == 1
    assert req["content_encoding"] is None
    assert req["body_size"] == len("1.2.3.4:5 [x] é\n".encode())
    assert req["headers"]["x-sekoiaio-intake-key"] == VALID_KEY


def test_plain_batch_splits_on_lf(intake: FakeIntake, client: httpx.Client) -> None:
    r = client.post("/plain/batch", content=b"a\nb\r\nc with\nd\n", headers=KEY_HEADER)
    assert r.status_code == 200
    ids = r.json()["event_ids"]
    assert len(ids) == 4 and all(_is_uuid4(i) for i in ids)
    assert intake.event_texts() == ["a", "b\r", "c with", "d"]
    assert {e.endpoint for e in intake.events} == {"/plain/batch"}


def test_jsons(intake: FakeIntake, client: httpx.Client) -> None:
    events = ["one", "two\nlines", '{"json": "as a string"}']
    r = client.post("/jsons", json=events, headers=KEY_HEADER)
    assert r.status_code == 200
    assert len(r.json()["event_ids"]) == 3
    assert intake.event_texts() == events


def test_batch(intake: FakeIntake, client: httpx.Client) -> None:
    r = client.post("/batch", json={"intake_key": VALID_KEY, "jsons": ["e1", "e2"]})
    assert r.status_code == 200
    assert len(r.json()["event_ids"]) == 2
    assert intake.events == [
        Received("e1", None, "/batch", 0),
        Received("e2", None, "/batch", 0),
    ]


def test_array_with_and_without_timestamp(intake: FakeIntake, client: httpx.Client) -> None:
    body = [
        {"intake_key": VALID_KEY, "json": "e1", "timestamp": "2021-04-05T21:33:31+02:00"},
        {"intake_key": VALID_KEY, "json": "e2"},
    ]
    r = client.post("/array", json=body)
    assert r.status_code == 200
    assert len(r.json()["event_ids"]) == 2
    assert intake.events == [
        Received("e1", "2021-04-05T21:33:31+02:00", "/array", 0),
        Received("e2", None, "/array", 0),
    ]


def test_timestamp_header(intake: FakeIntake, client: httpx.Client) -> None:
    ts = "2024-01-02T03:04:05Z"
    headers = {**KEY_HEADER, "X-SEKOIAIO-EVENT-TIMESTAMP": ts}
    assert client.post("/plain", content=b"p", headers=headers).status_code == 200
    assert client.post("/plain/batch", content=b"b1\nb2", headers=headers).status_code == 200
    assert client.post("/jsons", json=["j"], headers=headers).status_code == 200
    assert [e.timestamp for e in intake.events] == [ts] * 4
    assert [e.request_no for e in intake.events] == [0, 1, 1, 2]


def test_unknown_path_and_method(intake: FakeIntake, client: httpx.Client) -> None:
    assert client.post("/nope", content=b"x", headers=KEY_HEADER).status_code == 404
    assert client.post("/plain/", content=b"x", headers=KEY_HEADER).status_code == 404
    assert client.get("/plain", headers=KEY_HEADER).status_code == 405
    assert intake.events == []
    assert [r["status"] for r in intake.requests] == [404, 404, 405]


def test_prefix() -> None:
    with FakeIntake(prefix=PREFIX) as fi:
        assert fi.url == f"https://127.0.0.1:{fi.port}{PREFIX}"
        with httpx.Client(verify=fi.client_ssl_context()) as c:
            assert c.post(fi.url + "/plain", content=b"x", headers=KEY_HEADER).status_code == 200
            bare = f"https://127.0.0.1:{fi.port}/plain"
            assert c.post(bare, content=b"y", headers=KEY_HEADER).status_code == 404
            # httpx's base_url keeps the prefix, like the forwarder must.
        with httpx.Client(base_url=fi.url, verify=fi.client_ssl_context()) as c:
            assert c.post("/jsons", json=["z"], headers=KEY_HEADER).status_code == 200
        assert fi.event_texts() == ["x", "z"]
        assert fi.requests[-1]["path"] == PREFIX + "/jsons"
        assert fi.requests[-1]["endpoint"] == "/jsons"
    with pytest.raises(ValueError):
        FakeIntake(prefix="api/")


# -- intake key ---------------------------------------------------------------------------------


def test_key_via_basic_auth_and_query(intake: FakeIntake, client: httpx.Client) -> None:
    assert client.post("/plain", content=b"basic", auth=("any", VALID_KEY)).status_code == 200
    r = client.post("/jsons", json=["query"], params={"intake_key": VALID_KEY})
    assert r.status_code == 200
    assert intake.event_texts() == ["basic", "query"]
    assert intake.requests[1]["query"] == f"intake_key={VALID_KEY}"


@pytest.mark.parametrize("endpoint", ["/plain", "/plain/batch", "/jsons"])
def test_wrong_or_missing_key_header(
    intake: FakeIntake, client: httpx.Client, endpoint: str
) -> None:
    body = b'["x"]' if endpoint == "/jsons" else b"x"
    wrong = {"X-SEKOIAIO-INTAKE-KEY": "B" * 32}
    assert client.post(endpoint, content=body, headers=wrong).status_code == 401
    assert client.post(endpoint, content=body).status_code == 401
    bad_basic = {"Authorization": "Basic " + base64.b64encode(b"u:wrong").decode()}
    assert client.post(endpoint, content=body, headers=bad_basic).status_code == 401
    assert client.post(endpoint, content=body, params={"intake_key": "x"}).status_code == 401
    assert intake.events == []


def test_wrong_key_in_body(intake: FakeIntake, client: httpx.Client) -> None:
    # The key in a header does not count for /batch and /array: it belongs to the body.
    assert client.post("/batch", json={"jsons": ["x"]}, headers=KEY_HEADER).status_code == 401
    assert client.post("/batch", json={"intake_key": "B", "jsons": ["x"]}).status_code == 401
    body = [
        {"intake_key": VALID_KEY, "json": "ok"},
        {"intake_key": "B" * 32, "json": "bad"},
    ]
    assert client.post("/array", json=body).status_code == 401
    assert client.post("/array", json=[{"json": "nokey"}], headers=KEY_HEADER).status_code == 401
    assert intake.events == []


def test_custom_key() -> None:
    with FakeIntake(key="Custom0123456789") as fi:
        with httpx.Client(base_url=fi.url, verify=fi.client_ssl_context()) as c:
            ok = {"X-SEKOIAIO-INTAKE-KEY": "Custom0123456789"}
            assert c.post("/plain", content=b"x", headers=ok).status_code == 200
            assert c.post("/plain", content=b"x", headers=KEY_HEADER).status_code == 401
        assert fi.key == "Custom0123456789"


# -- bodies -------------------------------------------------------------------------------------


def test_gzip(intake: FakeIntake, client: httpx.Client) -> None:
    gz = {**KEY_HEADER, "Content-Encoding": "gzip"}
    payload = gzip.compress(orjson.dumps(["g1", "g2"]))
    assert client.post("/jsons", content=payload, headers=gz).status_code == 200
    assert client.post("/plain", content=gzip.compress(b"g3"), headers=gz).status_code == 200
    batch = gzip.compress(orjson.dumps({"intake_key": VALID_KEY, "jsons": ["g4"]}))
    assert client.post("/batch", content=batch, headers=gz).status_code == 200
    assert intake.event_texts() == ["g1", "g2", "g3", "g4"]
    reqs = intake.requests
    assert [r["content_encoding"] for r in reqs] == ["gzip"] * 3
    assert reqs[0]["body_size"] == len(payload)
    # A body that is not gzip although announced as such.
    assert client.post("/jsons", content=b'["x"]', headers=gz).status_code == 400
    assert len(intake.events) == 4


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [
        ("/jsons", b"not json"),
        ("/jsons", b'{"a": "object, not list"}'),
        ("/jsons", b'["ok", {"an": "object"}]'),
        ("/jsons", b'["ok", 3]'),
        ("/batch", b"[1, 2"),
        ("/batch", b'{"intake_key": "KEY", "jsons": "not a list"}'),
        ("/batch", b'{"intake_key": "KEY", "jsons": [{"an": "object"}]}'),
        ("/array", b'{"not": "a list"}'),
        ("/array", b'["not an object"]'),
        ("/array", b'[{"intake_key": "KEY", "json": {"an": "object"}}]'),
        ("/array", b'[{"intake_key": "KEY", "json": "e", "timestamp": 3}]'),
        ("/plain", b"\xff\xfe not utf-8"),
        ("/plain", b""),
    ],
)
def test_malformed_body_400(
    intake: FakeIntake, client: httpx.Client, endpoint: str, body: bytes
) -> None:
    body = body.replace(b"KEY", VALID_KEY.encode())
    r = client.post(endpoint, content=body, headers=KEY_HEADER)
    assert r.status_code == 400
    assert intake.events == []
    assert intake.requests[0]["status"] == 400


def test_oversized_plain_413(intake: FakeIntake, client: httpx.Client) -> None:
    limit = "a" * MAX_EVENT_BYTES
    assert MAX_EVENT_BYTES == 256000
    assert client.post("/plain", content=limit, headers=KEY_HEADER).status_code == 200
    r = client.post("/plain", content=limit + "b", headers=KEY_HEADER)
    assert r.status_code == 413
    # Counted in UTF-8 bytes, not characters.
    r = client.post("/plain", content=("é" * (MAX_EVENT_BYTES // 2 + 1)), headers=KEY_HEADER)
    assert r.status_code == 413
    assert intake.event_texts() == [limit]
    assert [len(e.event) for e in intake.rejected] == [
        MAX_EVENT_BYTES + 1,
        MAX_EVENT_BYTES // 2 + 1,
    ]
    assert intake.requests[1]["n_rejected"] == 1


@pytest.mark.parametrize("endpoint", ["/jsons", "/batch", "/array", "/plain/batch"])
def test_oversized_in_batch(intake: FakeIntake, client: httpx.Client, endpoint: str) -> None:
    big = "x" * (MAX_EVENT_BYTES + 1)

    def post(events: list[str]) -> httpx.Response:
        if endpoint == "/jsons":
            return client.post(endpoint, json=events, headers=KEY_HEADER)
        if endpoint == "/plain/batch":
            return client.post(endpoint, content="\n".join(events), headers=KEY_HEADER)
        if endpoint == "/batch":
            return client.post(endpoint, json={"intake_key": VALID_KEY, "jsons": events})
        return client.post(endpoint, json=[{"intake_key": VALID_KEY, "json": e} for e in events])

    r = post(["small1", big, "small2"])
    assert r.status_code == 200
    assert len(r.json()["event_ids"]) == 2
    assert intake.event_texts() == ["small1", "small2"]
    assert intake.rejected == [Received(big, None, endpoint, 0)]

    r = post([big, big])
    assert r.status_code == 413
    assert intake.event_texts() == ["small1", "small2"]
    assert len(intake.rejected) == 3
    assert intake.requests[1]["n_events"] == 0
    assert intake.requests[1]["n_rejected"] == 2


def test_chunked_request_body(intake: FakeIntake, client: httpx.Client) -> None:
    def gen() -> Iterator[bytes]:
        yield b'["c1", '
        yield b'"c2"]'

    r = client.post("/jsons", content=gen(), headers=KEY_HEADER)
    assert r.status_code == 200
    assert intake.event_texts() == ["c1", "c2"]


# -- failure injection --------------------------------------------------------------------------


def test_inject_503_then_429_then_success(intake: FakeIntake, client: httpx.Client) -> None:
    intake.inject(503, times=3)
    intake.inject(429, headers={"Retry-After": "2"}, body=b'{"message": "slow down"}')
    assert intake.pending_injections() == 4
    statuses = []
    for _ in range(6):
        r = client.post("/jsons", json=["once"], headers=KEY_HEADER)
        statuses.append(r.status_code)
        if r.status_code == 429:
            assert r.headers["Retry-After"] == "2"
            assert r.json() == {"message": "slow down"}
        if r.is_success:
            break
    assert statuses == [503, 503, 503, 429, 200]
    assert intake.event_texts() == ["once"]
    assert intake.events[0].request_no == 4
    reqs = intake.requests
    assert [r["status"] for r in reqs] == statuses
    assert [r["forced"] for r in reqs] == [True] * 4 + [False]
    assert [r["n_events"] for r in reqs] == [0, 0, 0, 0, 1]
    assert intake.pending_injections() == 0


def test_inject_applies_even_to_bad_requests(intake: FakeIntake, client: httpx.Client) -> None:
    intake.inject(500)
    assert client.post("/nope").status_code == 500
    assert client.post("/nope").status_code == 404


def test_inject_connection_drop(intake: FakeIntake, client: httpx.Client) -> None:
    intake.inject(0)
    with pytest.raises(httpx.TransportError):
        client.post("/plain", content=b"lost", headers=KEY_HEADER)
    assert client.post("/plain", content=b"kept", headers=KEY_HEADER).status_code == 200
    assert intake.event_texts() == ["kept"]
    assert intake.requests[0]["status"] == 0


def test_delay(intake: FakeIntake, client: httpx.Client) -> None:
    intake.set_delay(0.5)
    # The answer is held back: a client that gives up after 0.1 s gets none, a patient one does.
    with pytest.raises(httpx.ReadTimeout):
        client.post("/plain", content=b"too slow", headers=KEY_HEADER, timeout=0.1)
    assert client.post("/plain", content=b"slow", headers=KEY_HEADER).status_code == 200
    intake.set_delay(0)
    # No longer: answered within half the old delay (held back, it would time out).
    r = client.post("/plain", content=b"fast", headers=KEY_HEADER, timeout=0.25)
    assert r.status_code == 200
    # The timed-out request was still ingested once its delay was over (as a real server would):
    # the forwarder has to live with such duplicates.
    assert intake.wait_for(3, timeout=5), f"events at the intake: want 3, got {len(intake.events)}"
    assert sorted(intake.event_texts()) == ["fast", "slow", "too slow"]


def test_set_success_status_202() -> None:
    with FakeIntake(success_status=202) as fi:
        with httpx.Client(base_url=fi.url, verify=fi.client_ssl_context()) as c:
            r = c.post("/jsons", json=["a"], headers=KEY_HEADER)
            assert r.status_code == 202
            assert r.is_success
        assert fi.event_texts() == ["a"]


# -- outage -------------------------------------------------------------------------------------


def test_set_down_and_up_same_port(intake: FakeIntake, client: httpx.Client) -> None:
    port = intake.port
    assert client.post("/plain", content=b"before", headers=KEY_HEADER).status_code == 200
    intake.set_down(True)
    # The pooled keep-alive connection was dropped and new connections are refused.
    with pytest.raises(httpx.ConnectError):
        client.post("/plain", content=b"during", headers=KEY_HEADER)
    with (
        httpx.Client(verify=intake.client_ssl_context()) as fresh,
        pytest.raises(httpx.ConnectError),
    ):
        fresh.post(intake.url + "/plain", content=b"during", headers=KEY_HEADER)
    intake.set_down(True)  # idempotent
    intake.set_down(False)
    assert intake.port == port
    assert client.post("/plain", content=b"after", headers=KEY_HEADER).status_code == 200
    assert intake.event_texts() == ["before", "after"]


def test_set_down_while_request_delayed(intake: FakeIntake, client: httpx.Client) -> None:
    intake.set_delay(5)
    errors: list[Exception] = []

    def send() -> None:
        try:
            client.post("/plain", content=b"in flight", headers=KEY_HEADER)
        except httpx.TransportError as exc:
            errors.append(exc)

    t = threading.Thread(target=send)
    t.start()
    wait_until(lambda: intake.requests, 5, "the request held by the delay", step=0.01)
    intake.set_down(True)
    t.join(5)
    assert len(errors) == 1
    assert intake.wait_for_requests(1, timeout=5)  # the handler has finished with it
    assert intake.events == []
    assert intake.requests[0]["dropped"] is True
    intake.set_delay(0)
    intake.set_down(False)
    assert client.post("/plain", content=b"retry", headers=KEY_HEADER).status_code == 200
    assert intake.event_texts() == ["retry"]


def test_stop_and_restart_keeps_port() -> None:
    fi = FakeIntake()
    fi.start()
    port = fi.port
    fi.stop()
    fi.start()
    try:
        assert fi.port == port
        with httpx.Client(verify=fi.client_ssl_context()) as c:
            assert c.post(fi.url + "/plain", content=b"x", headers=KEY_HEADER).status_code == 200
    finally:
        fi.stop()


# -- connections, concurrency, speed ------------------------------------------------------------


def test_keep_alive_reuses_connection(intake: FakeIntake, client: httpx.Client) -> None:
    for i in range(5):
        assert client.post("/plain", content=f"e{i}", headers=KEY_HEADER).status_code == 200
    assert len({r["connection"] for r in intake.requests}) == 1
    with httpx.Client(verify=intake.client_ssl_context()) as other:
        other.post(intake.url + "/plain", content=b"x", headers=KEY_HEADER)
    assert len({r["connection"] for r in intake.requests}) == 2


def test_keepalive_timeout_closes_idle_connections() -> None:
    with FakeIntake(keepalive_timeout=0.2) as fi:
        with httpx.Client(base_url=fi.url, verify=fi.client_ssl_context()) as c:
            assert c.post("/plain", content=b"1", headers=KEY_HEADER).status_code == 200
            time.sleep(0.5)  # idle past keepalive_timeout: the clock the feature is about
            # httpx notices the closed idle connection and opens a new one.
            assert c.post("/plain", content=b"2", headers=KEY_HEADER).status_code == 200
        assert len({r["connection"] for r in fi.requests}) == 2


def test_concurrent_requests(intake: FakeIntake) -> None:
    intake.set_delay(0.3)
    n_threads, per_thread = 8, 3

    def worker(i: int) -> None:
        with httpx.Client(base_url=intake.url, verify=intake.client_ssl_context()) as c:
            for j in range(per_thread):
                r = c.post("/jsons", json=[f"{i}-{j}"], headers=KEY_HEADER)
                assert r.status_code == 200

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    # Served in parallel: half the clients' requests in the handler at once (a server taking
    # one at a time never has two: each is recorded as it comes in, answered 0.3 s later).
    wait_until(lambda: sum(r["status"] is None for r in intake.requests) >= n_threads // 2, 10,
               f"{n_threads // 2} requests in the handler at once", step=0.01)
    for t in threads:
        t.join(30)
        assert not t.is_alive(), "a client hung"
    assert intake.wait_for(n_threads * per_thread, timeout=1), (
        f"events at the intake: want {n_threads * per_thread}, got {len(intake.events)}")
    expected = {f"{i}-{j}" for i in range(n_threads) for j in range(per_thread)}
    assert set(intake.event_texts()) == expected
    assert sorted({e.request_no for e in intake.events}) == list(range(n_threads * per_thread))


def test_100k_events_fast(intake: FakeIntake, client: httpx.Client) -> None:
    line = (
        "10.0.0.1:51234 [26/Nov/2024:21:59:00.123] fe be/srv 0/0/1/2/3 200 512 - - ---- "
        '1/1/0/0/0 0/0 "GET /x HTTP/1.1"'
    )
    # Its speed is a figure of `make bench` (bench.micro.fake_intake_ingest), not a test.
    for b in range(20):
        events = [f"{line} #{b * 5000 + i}" for i in range(5000)]
        body = gzip.compress(orjson.dumps(events), compresslevel=1)
        headers = {**KEY_HEADER, "Content-Encoding": "gzip", "Content-Type": "application/json"}
        r = client.post("/jsons", content=body, headers=headers)
        assert r.status_code == 200
        assert len(r.json()["event_ids"]) == 5000
    assert intake.wait_for(100_000, timeout=1), (
        f"events at the intake: want 100000, got {len(intake.events)}")
    texts = intake.event_texts()
    assert texts[0].endswith("#0") and texts[-1].endswith("#99999")


def test_wait_for_timeout(intake: FakeIntake) -> None:
    # (That it waits meanwhile, rather than giving up at once: the next test.)
    assert intake.wait_for(1, timeout=0.2) is False
    assert intake.wait_for(0, timeout=0), f"events at the intake: want 0, got {len(intake.events)}"


def test_wait_for_wakes_up_on_arrival(intake: FakeIntake, client: httpx.Client) -> None:
    def later() -> None:
        time.sleep(0.2)  # posts later, while wait_for waits: the scenario, not a wait
        client.post("/plain/batch", content=b"a\nb", headers=KEY_HEADER)

    t = threading.Thread(target=later)
    t.start()
    assert intake.wait_for(2, timeout=10), f"events at the intake: want 2, got {len(intake.events)}"
    t.join()
    assert intake.wait_for_requests(1, timeout=1), "requests answered: want 1"


def test_reset(intake: FakeIntake, client: httpx.Client) -> None:
    client.post("/plain", content=b"x", headers=KEY_HEADER)
    intake.inject(503)
    intake.reset()
    assert intake.events == [] and intake.requests == [] and intake.pending_injections() == 0
    assert client.post("/plain", content=b"y", headers=KEY_HEADER).status_code == 200
    assert intake.events == [Received("y", None, "/plain", 0)]


def test_factory() -> None:
    with fake_intake_factory() as make:
        a = make()
        a_ctx = a.client_ssl_context()
        b = make(key="Other0123456789abc", prefix=PREFIX)
        assert a.port != b.port
        assert b.url.endswith(PREFIX)
        with httpx.Client(verify=b.client_ssl_context()) as c:
            hdr = {"X-SEKOIAIO-INTAKE-KEY": "Other0123456789abc"}
            assert c.post(b.url + "/plain", content=b"x", headers=hdr).status_code == 200
    # Stopped on exit.
    with httpx.Client(verify=a_ctx) as c, pytest.raises(httpx.ConnectError):
        c.post(a.url + "/plain", content=b"x", headers=KEY_HEADER)
