"""SIGHUP reload: the plan (pure), the parts it swaps (readers, delivery), and the real daemon
re-reading its config under traffic: new intake and key, new filter on an open connection,
listeners added and removed, invalid configs refused with the old one kept."""

from __future__ import annotations

import asyncio
import collections
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.daemon import Daemon, base_config, write_toml
from devtools.probe import until, wait_at_rest, wait_until
from devtools.traffic import octet_frame, send_udp, traditional
from haproxy_forwarder.config import Settings
from haproxy_forwarder.delivery import Delivery
from haproxy_forwarder.ingest import AUTO, DATAGRAM, ProgramFilter
from haproxy_forwarder.observability.logs import MASK
from haproxy_forwarder.reload import LIVE, flatten, make_plan
from haproxy_forwarder.sinks import Kind, Outcome
from tests.fake_intake import VALID_KEY, FakeIntake, fake_intake_factory
from tests.ingest_contract import RECEIVED, Factory, implementation_params, run
from tests.test_delivery import FakeSink, events
from tests.test_delivery import make as make_delivery
from tests.test_delivery import run as run_async
from tests.test_ingest import IMPLEMENTATIONS

OTHER_KEY = "SecondIntakeKey0123456789abcdefZ"


def settings(**sections: Any) -> Settings:
    return Settings(**sections)


# -- the plan -------------------------------------------------------------------------------


def test_same_config_plans_nothing() -> None:
    s = settings(intake={"key": VALID_KEY})
    plan = make_plan(s, settings(intake={"key": VALID_KEY}))
    assert (plan.changes, plan.restart) == ({}, {})
    assert not (plan.sink("default") or plan.filter or plan.batch
                or plan.backoff("default") or plan.in_flight)
    assert (plan.listeners_add, plan.listeners_remove) == ([], [])


def test_every_live_setting_names_a_real_one() -> None:
    # A typo in the tables would turn a live setting into "restart needed" (or claim nothing).
    assert set(LIVE) <= set(flatten(Settings()))
    # The spool is open and locked for the life of the process: none of it is live.
    assert not {n for n in LIVE if n.startswith("spool.")}


def test_new_key_and_url_mean_a_new_client_and_the_key_is_never_shown() -> None:
    old = settings(intake={"key": VALID_KEY, "url": "https://a.example"})
    new = settings(intake={"key": OTHER_KEY, "url": "https://b.example"})
    plan = make_plan(old, new)
    assert plan.sink("default") and not plan.workers("default")
    assert plan.changes["intake.url"] == ("https://a.example", "https://b.example")
    assert plan.changes["intake.key"] == (MASK, MASK)
    assert VALID_KEY not in repr(plan.changes) and OTHER_KEY not in repr(plan.changes)
    assert plan.effective.intake.key is not None
    assert plan.effective.intake.key.get_secret_value() == OTHER_KEY
    # Setting a key where there was none is a change too.
    assert make_plan(settings(), new).changes["intake.key"] == (None, MASK)


def test_concurrency_means_a_new_client_and_new_workers() -> None:
    plan = make_plan(settings(), settings(intake={"concurrency": 3}))
    assert plan.sink("default") and plan.workers("default")


def test_filter_batch_retry_and_in_flight_are_live() -> None:
    plan = make_plan(settings(), settings(
        filter={"programs": ["haproxy", "nginx"], "keep_tag": []},
        batch={"max_events": 10, "max_in_flight": 8},
        intake={"retry_max": 5.0},
    ))
    assert plan.filter and plan.batch and plan.in_flight and plan.backoff("default")
    assert not plan.sink("default") and plan.restart == {}
    assert plan.effective.filter.programs == ["haproxy", "nginx"]


def test_listener_changes_as_added_and_removed_addresses() -> None:
    old = settings(listen={"tcp": ["127.0.0.1:1514", "127.0.0.1:1515"], "udp": ["127.0.0.1:1514"]})
    new = settings(listen={"tcp": ["127.0.0.1:1515", "127.0.0.1:1516", "127.0.0.1:1516"],
                           "udp": []})
    plan = make_plan(old, new)
    assert plan.listeners_add == [("tcp", "127.0.0.1:1516"), ("tcp", "127.0.0.1:1516")]
    assert plan.listeners_remove == [("tcp", "127.0.0.1:1514"), ("udp", "127.0.0.1:1514")]


def test_settings_fixed_for_the_process_are_kept_and_named(tmp_path: Path) -> None:
    old = settings(spool={"dir": str(tmp_path / "a")}, status={"listen": "127.0.0.1:9514"},
                   log={"level": "info"}, listen={"max_message_size": 65536})
    new = settings(spool={"dir": str(tmp_path / "b"), "mode": "always"},
                   status={"listen": "127.0.0.1:9999", "stall_after": 10.0},
                   log={"level": "debug", "stats_interval": 5.0},
                   listen={"max_message_size": 1 << 20, "max_connections": 10})
    plan = make_plan(old, new)
    assert set(plan.restart) == {"spool.dir", "spool.mode", "status.listen", "log.level",
                                 "listen.max_message_size"}
    assert plan.restart["spool.dir"] == (str(tmp_path / "a"), str(tmp_path / "b"))
    e = plan.effective
    # Kept as they run ...
    assert e.spool.dir == tmp_path / "a" and e.spool.mode == "overflow"
    assert (e.status.listen, e.log.level, e.listen.max_message_size) == (
        "127.0.0.1:9514", "info", 65536)
    # ... while their live neighbours change.
    assert (e.status.stall_after, e.log.stats_interval, e.listen.max_connections) == (
        10.0, 5.0, 10)
    assert "listen.max_connections" in plan.changes


def test_dry_run_cannot_be_switched_live() -> None:
    plan = make_plan(settings(intake={"dry_run": True}), settings(intake={"key": VALID_KEY}))
    assert "intake.dry_run" in plan.restart and plan.effective.intake.dry_run


# -- readers follow their filter (both implementations, one contract) -------------------------


@pytest.fixture(scope="module", params=implementation_params(IMPLEMENTATIONS))
def impl(request: pytest.FixtureRequest) -> Factory:
    factory: Factory = request.param
    return factory


NGINX = traditional("nginx", "from nginx") + b"\n"
HAPROXY = traditional("haproxy", "from haproxy") + b"\n"


def test_an_open_stream_follows_a_filter_update(impl: Factory) -> None:
    filt = ProgramFilter(["haproxy"], keep_tag=())
    reader = impl(filt, 65536, AUTO)
    assert run(reader, [HAPROXY + NGINX], close=False).events == ["from haproxy"]
    # A frame cut across the update is judged by the new filter, as is everything after.
    reader.feed(NGINX[:20], RECEIVED)
    filt.update(["nginx"], keep_tag=["nginx"])
    out = run(reader, [NGINX[20:], HAPROXY, NGINX])
    assert out.events == ["nginx[4242]: from nginx", "nginx[4242]: from nginx"]
    assert (out.accepted, out.filtered) == (2, 1)


def test_a_datagram_reader_follows_a_filter_update(impl: Factory) -> None:
    filt = ProgramFilter(["haproxy"], keep_tag=["haproxy"])
    reader = impl(filt, 65536, DATAGRAM)
    assert run(reader, [NGINX, HAPROXY]).events == ["haproxy[4242]: from haproxy"]
    filt.update(["haproxy", "nginx"], keep_tag=())
    assert run(reader, [NGINX, HAPROXY]).events == ["from nginx", "from haproxy"]


def test_filter_update_is_validated_like_a_new_filter() -> None:
    filt = ProgramFilter(["haproxy"])
    with pytest.raises(ValueError):
        filt.update([], keep_tag=())
    with pytest.raises(ValueError):
        filt.update([""], keep_tag=())
    assert filt.programs == (b"haproxy",)


# -- delivery: a new sink, more or fewer workers ----------------------------------------------


def test_a_request_in_flight_ends_on_the_old_sink_which_is_then_closed(tmp_path: Path) -> None:
    old, new = FakeSink(), FakeSink()
    old.gate = gate = asyncio.Event()

    async def main() -> None:
        d, counters, _log, _p = make_delivery(tmp_path, old, None, workers=2)
        d.start()
        d.submit(events(0, 3))
        await until(lambda: old.attempts, 5, "a request to the old sink")
        d.replace_sink(new)
        d.submit(events(3, 3))
        await until(lambda: new.accepted == [f"event {i}" for i in range(3, 6)], 5,
                    "events 3-5 accepted by the new sink", detail=lambda: new.accepted)
        assert not old.closed  # its request is still on the wire
        gate.set()
        await until(lambda: old.closed, 5, "the old sink closed")
        assert old.accepted == [f"event {i}" for i in range(3)]
        assert counters.delivered_events == 6
        await d.stop()

    run_async(main())


def test_a_retry_after_the_swap_goes_to_the_new_sink(tmp_path: Path) -> None:
    failing = FakeSink(script=[Outcome(Kind.AUTH, 401, "bad key")])
    failing.gate = gate = asyncio.Event()
    new = FakeSink()

    async def main() -> None:
        d, _c, _log, _p = make_delivery(tmp_path, failing, None, workers=1)
        d.start()
        d.submit(events(0, 2))
        await until(lambda: failing.attempts, 5, "a request to the failing sink")
        d.replace_sink(new)
        gate.set()  # answers 401: the next attempt must use the new key
        await until(lambda: new.accepted == ["event 0", "event 1"], 10,
                    "the retry accepted by the new sink", detail=lambda: new.accepted)
        assert failing.accepted == [] and len(failing.attempts) == 1
        await until(lambda: failing.closed, 5, "the failing sink closed")
        await d.stop()

    run_async(main())


def _busy(d: Delivery) -> int:
    return len(d.router.held)


def test_workers_follow_concurrency_both_ways(tmp_path: Path) -> None:
    sink = FakeSink()
    sink.gate = gate = asyncio.Event()

    async def settled(d: Delivery, busy: int, waiting: int) -> None:
        await until(lambda: (_busy(d), len(d.router.memory)) == (busy, waiting), 5,
                    f"{busy} batches taken, {waiting} waiting",
                    detail=lambda: (_busy(d), len(d.router.memory)))
        # Every task that is ready gets its turns (no clock): no other worker takes one.
        for _ in range(100):
            await asyncio.sleep(0)
        assert (_busy(d), len(d.router.memory)) == (busy, waiting)

    async def main() -> None:
        d, counters, _log, _p = make_delivery(tmp_path, sink, None, workers=1)
        d.start()
        for i in range(4):
            d.submit(events(i * 10, 1))
        await settled(d, 1, 3)
        d.set_workers(3)
        await settled(d, 3, 1)  # two more requests in parallel
        d.set_workers(1)
        gate.set()
        await until(lambda: counters.delivered_events >= 4, 5, "4 events delivered")
        gate.clear()
        for i in range(3):
            d.submit(events(100 + i, 1))
        await settled(d, 1, 2)  # the retired workers took nothing more
        gate.set()
        await until(lambda: counters.delivered_events >= 7, 5, "7 events delivered")
        await d.stop()

    run_async(main())


# -- the real daemon --------------------------------------------------------------------------


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def intakes() -> Iterator[Callable[..., FakeIntake]]:
    with fake_intake_factory() as make:
        yield make


def hup(d: Daemon) -> None:
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)


def wait_count(d: Daemon, name: str, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    def found() -> list[dict[str, Any]] | None:
        lines = d.events(name)
        return lines if len(lines) >= n else None

    return wait_until(found, timeout, f"{n} {name!r} lines", detail=d.stderr_text)


def frame(program: str, msg: str) -> bytes:
    return octet_frame(traditional(program, msg))


def is_open(sock: socket.socket) -> bool:
    """True while the daemon has neither closed nor half-closed the connection."""
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


def wait_closed(sock: socket.socket, timeout: float = 5.0) -> None:
    wait_until(lambda: not is_open(sock), timeout, "the daemon closing the connection")


def texts(*intakes: FakeIntake) -> collections.Counter[str]:
    return collections.Counter(e.event for fi in intakes for e in fi.events)


def wait_texts(fi: FakeIntake, want: set[str], timeout: float = 15.0) -> None:
    wait_until(lambda: want <= set(texts(fi)), timeout, f"{sorted(want)[:3]} at the intake",
               detail=lambda: f"missing {sorted(want - set(texts(fi)))[:3]}")


class Sender(threading.Thread):
    """Keeps writing numbered HAProxy events on one connection until stopped."""

    def __init__(self, sock: socket.socket, prefix: str) -> None:
        super().__init__(daemon=True)
        self.sock, self.prefix = sock, prefix
        self.sent: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            msg = f"{self.prefix}-{len(self.sent)}"
            self.sock.sendall(frame("haproxy", msg))
            self.sent.append(msg)
            time.sleep(0.002)  # the stream's pace: traffic across the reload, not a wait


def test_sighup_moves_to_a_new_intake_and_filter_without_a_dropped_connection_or_event(
    tmp_path: Path, intakes: Callable[..., FakeIntake]
) -> None:
    first, second = intakes(), intakes(key=OTHER_KEY)
    cfg = base_config(tmp_path, intake={"url": first.url, "ca_file": first.ca_file,
                                        "key": VALID_KEY},
                      filter={"programs": ["haproxy"]})
    with Daemon(tmp_path, cfg) as d, socket.create_connection(("127.0.0.1", d.tcp_port)) as s:
        s.sendall(frame("haproxy", "before") + frame("nginx", "nginx-before"))
        wait_texts(first, {"before"})
        sender = Sender(s, "during")
        sender.start()
        wait_until(lambda: len(sender.sent) >= 50, 10, "50 events sent before the reload")
        # The new intake wants another key: events arriving there prove the new key is used.
        cfg["intake"] = {"url": second.url, "ca_file": second.ca_file, "key": OTHER_KEY}
        cfg["filter"] = {"programs": ["haproxy", "nginx"], "keep_tag": []}
        write_toml(d.config_path, cfg)
        hup(d)
        reloaded = d.wait_log("reloaded")
        n_at_reload = len(sender.sent)
        wait_until(lambda: len(sender.sent) >= n_at_reload + 50, 10,  # on across the reload
                   "50 more events sent after the reload")
        sender.halt.set()
        sender.join()
        s.sendall(frame("haproxy", "after") + frame("nginx", "nginx-after"))
        wait_texts(second, {"after", "nginx-after"})
        assert is_open(s)  # the same socket, never closed
        s.sendall(frame("haproxy", "last"))
        wait_texts(second, {"last"})
        wait_at_rest(d.status_port, closed=False)  # nothing held: a duplicate would be there
        assert d.stop() == 0
    assert set(reloaded["changes"]) == {"intake.url", "intake.key", "intake.ca_file",
                                        "filter.programs", "filter.keep_tag"}
    assert reloaded["changes"]["intake.key"] == [MASK, MASK]
    want = collections.Counter(["before", *sender.sent, "after", "nginx-after", "last"])
    assert texts(first, second) == want  # none lost, none twice, across both intakes
    assert "nginx-before" not in texts(first, second)  # filtered under the old filter
    assert not first.rejected and not second.rejected  # no request with the wrong key
    assert {"after", "nginx-after", "last"}.isdisjoint(texts(first))
    assert d.events("stopped")[-1]["connections_accepted"] == 1
    assert d.events("stopped")[-1]["reloads"] == 1
    for secret in (VALID_KEY, OTHER_KEY):
        assert secret not in d.stderr_text()


def test_sighup_opens_and_closes_listeners_and_keeps_the_unchanged_one(
    tmp_path: Path, intake: FakeIntake
) -> None:
    old_port, new_port = free_port(), free_port()
    old_udp, new_udp = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    cfg = base_config(tmp_path, intake={"url": intake.url, "ca_file": intake.ca_file,
                                        "key": VALID_KEY},
                      listen={"tcp": ["127.0.0.1:0", f"127.0.0.1:{old_port}"],
                              "udp": [f"127.0.0.1:{old_udp}"]})
    with Daemon(tmp_path, cfg) as d, \
            socket.create_connection(("127.0.0.1", d.tcp_port)) as kept, \
            socket.create_connection(("127.0.0.1", old_port)) as leaving:
        kept.sendall(frame("haproxy", "kept-1"))
        leaving.sendall(frame("haproxy", "leaving-1"))
        wait_texts(intake, {"kept-1", "leaving-1"})
        send_udp(old_udp, [traditional("haproxy", "udp-old")])
        wait_texts(intake, {"udp-old"})
        cfg["listen"] = {"tcp": ["127.0.0.1:0", f"127.0.0.1:{new_port}"],
                         "udp": [f"127.0.0.1:{new_udp}"]}
        write_toml(d.config_path, cfg)
        hup(d)
        d.wait_log("reloaded")
        # The removed listener is drained like at shutdown: a FIN, and what the sender still
        # writes is read; it waits up to the grace for us to close, so this reload is still
        # under way: a SIGHUP now runs one more reload after it.
        leaving.sendall(frame("haproxy", "leaving-2"))
        hup(d)
        wait_closed(leaving)
        with socket.create_connection(("127.0.0.1", new_port), timeout=5) as joined:
            joined.sendall(frame("haproxy", "joined-1"))
            wait_texts(intake, {"joined-1"})
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", old_port), timeout=5).close()
        send_udp(old_udp, [traditional("haproxy", "udp-old-after")])  # nobody listens
        send_udp(new_udp, [traditional("haproxy", "udp-new")])
        kept.sendall(frame("haproxy", "kept-2"))
        wait_texts(intake, {"kept-2", "leaving-2", "udp-new"})
        assert is_open(kept)
        wait_count(d, "reloaded", 2)  # the second SIGHUP's reload, run after the first
        assert d.stop() == 0
    assert texts(intake) == collections.Counter(
        ["kept-1", "leaving-1", "udp-old", "leaving-2", "joined-1", "udp-new", "kept-2"])
    closed = d.events("listener_closed")
    assert [(c["proto"], c["port"]) for c in closed] == [("tcp", old_port), ("udp", old_udp)]
    assert d.events("stopped")[-1]["reloads"] == 2


def test_an_invalid_config_is_refused_per_problem_and_the_old_one_stays(
    tmp_path: Path, intake: FakeIntake
) -> None:
    cfg = base_config(tmp_path, intake={"url": intake.url, "ca_file": intake.ca_file,
                                        "key": VALID_KEY},
                      filter={"programs": ["haproxy"]})
    with Daemon(tmp_path, cfg) as d, \
            socket.create_connection(("127.0.0.1", d.tcp_port)) as s, \
            socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        path = d.config_path
        failures = 0

        def refused(n: int) -> list[str]:
            nonlocal failures
            hup(d)
            failures += n
            return [r["problem"] for r in wait_count(d, "reload_failed", failures)[-n:]]

        path.write_text("[listen\ntcp = 1\n")
        assert "invalid TOML" in refused(1)[0]
        bad = {**cfg, "batch": {"max_events": 0}, "intake": {**cfg["intake"], "url": "ftp://x"}}
        write_toml(path, bad)
        assert sorted(p.split(":")[0] for p in refused(2)) == ["batch.max_events", "intake.url"]
        path.unlink()
        assert refused(1) == [f"{path}: config file not found"]
        write_toml(path, {**cfg, "intake": {k: v for k, v in cfg["intake"].items() if k != "key"}})
        assert refused(1)[0].startswith("intake.key: missing")
        bogus = tmp_path / "bogus-ca.pem"
        bogus.write_text("not a certificate\n")
        write_toml(path, {**cfg, "intake": {**cfg["intake"], "ca_file": str(bogus)}})
        # The CA file is loaded at validation: a config error naming the key.
        [problem] = refused(1)
        assert problem.startswith("intake.ca_file: ") and "no PEM certificate" in problem
        # Valid, but its new listener cannot be bound: nothing of it applies (not the filter).
        write_toml(path, {**cfg, "filter": {"programs": ["haproxy", "nginx"]},
                          "listen": {**cfg["listen"],
                                     "tcp": [*cfg["listen"]["tcp"], f"127.0.0.1:{taken}"]}})
        [problem] = refused(1)
        assert f"127.0.0.1:{taken}" in problem and problem.startswith("listen.tcp")
        s.sendall(frame("nginx", "still-filtered") + frame("haproxy", "still-flowing"))
        wait_texts(intake, {"still-flowing"})
        # Both frames read, nothing held: the filtered one would be at the intake now.
        wait_at_rest(d.status_port, frames=2, closed=False)
        assert is_open(s)
        assert d.stop() == 0
    assert texts(intake) == collections.Counter(["still-flowing"])
    assert not d.events("reloaded")
    last = d.events("stopped")[-1]
    assert (last["reloads"], last["reload_failures"]) == (0, 6)
    # Each problem is a log line of its own, never a traceback.
    assert "Traceback" not in d.stderr_text()
