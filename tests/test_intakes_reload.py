"""SIGHUP with several intakes, on a real daemon while streams flow (issue 19, item 4).

- A config with a single [intake] becomes [intakes.default] + a new intake "b" with a route
  moving one source to it, while two senders keep streaming numbered events on one connection
  each: nothing lost, nothing duplicated, the moved source's events go to "default" up to one
  point and to "b" from there on (its connection follows the new routes, no reconnect), the
  other source's all stay with "default"; the intake "default" is the same pipeline throughout
  (same spool directory, no `intake_removed`).
- An intake removed while it cannot deliver (down): its events are kept in its spool
  directory and reported (`intake_removed`, then `removed_intake_events_kept` at stop), never
  dropped; back in the config at the next start, they are delivered.
- An invalid route table is refused with one line per problem and the running one stays.
"""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.daemon import Daemon, base_config
from devtools.probe import samples, wait_at_rest, wait_until
from devtools.toml import write_toml
from devtools.traffic import octet_frame, traditional
from tests.fake_intake import FakeIntake

KEY_A = "A1" * 16
KEY_B = "B2" * 16


def intake_cfg(fi: FakeIntake, key: str) -> dict[str, Any]:
    return {"url": fi.url, "ca_file": fi.ca_file, "key": key}


@pytest.fixture
def two() -> Iterator[tuple[FakeIntake, FakeIntake]]:
    with FakeIntake(key=KEY_A) as a, FakeIntake(key=KEY_B) as b:
        yield a, b


class Streamer(threading.Thread):
    """One connection from `source`, sending "<tag> <n>" events until told to stop (and
    while `go` is set, so a test can hold it)."""

    def __init__(self, port: int, source: str, tag: str) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket()
        self.sock.bind((source, 0))
        self.sock.connect(("127.0.0.1", port))
        self.tag = tag
        self.sent = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            chunk = b"".join(octet_frame(traditional("haproxy", f"{self.tag} {self.sent + i}"))
                             for i in range(50))
            self.sock.sendall(chunk)
            self.sent += 50
            self.stop.wait(0.005)  # paced: a stream, not a burst

    def finish(self) -> None:
        self.stop.set()
        self.join(10)
        self.sock.shutdown(socket.SHUT_WR)
        self.sock.settimeout(30)
        while self.sock.recv(4096):
            pass
        self.sock.close()


def numbers(fi: FakeIntake, tag: str) -> list[int]:
    return [int(t.split()[1]) for t in fi.event_texts() if t.startswith(tag + " ")]


def test_sighup_adds_an_intake_and_moves_a_source_while_streams_flow(
        tmp_path: Path, two: tuple[FakeIntake, FakeIntake]) -> None:
    a, b = two
    cfg = base_config(tmp_path, intake=intake_cfg(a, KEY_A))
    with Daemon(tmp_path, cfg) as d:
        s2 = Streamer(d.tcp_port, "127.0.0.2", "two")
        s3 = Streamer(d.tcp_port, "127.0.0.3", "three")
        s2.start()
        s3.start()
        wait_until(lambda: len(numbers(a, "three")) >= 2000, 30, "a stream under way")
        new = {k: v for k, v in cfg.items() if k != "intake"}
        new["intakes"] = {"default": intake_cfg(a, KEY_A), "b": intake_cfg(b, KEY_B)}
        new["routes"] = [{"source": ["127.0.0.3/32"], "intake": "b"}, {"intake": "default"}]
        write_toml(d.config_path, new)
        d.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        reloaded = d.wait_log("reloaded")
        wait_until(lambda: len(numbers(b, "three")) >= 2000, 30, "the moved source at b")
        s2.finish()
        s3.finish()
        wait_at_rest(d.status_port, s2.sent + s3.sent, detail=d.stderr_text)
        m = samples(d.status_port)
        at_a2, at_a3, at_b3 = numbers(a, "two"), numbers(a, "three"), numbers(b, "three")
        # Nothing lost, nothing duplicated, nothing of .2 moved.
        assert sorted(at_a2) == list(range(s2.sent)) and numbers(b, "two") == []
        assert sorted(at_a3 + at_b3) == list(range(s3.sent))
        # One cut: before it at "default", from it on at "b" (the open connection followed).
        assert at_a3 and at_b3 and max(at_a3) < min(at_b3)
        assert m["delivered_events_total"] == s2.sent + s3.sent
        assert "intakes.b" in reloaded["changes"] and "routes" in reloaded["changes"]
        # "default" was not replaced: same pipeline, same spool directory.
        assert d.events("intake_removed") == [] and d.events("reload_failed") == []
        assert not (tmp_path / "spool" / "intakes" / "default").exists()
        assert (tmp_path / "spool" / "intakes" / "b").is_dir()
        text = d.stderr_text()
        assert KEY_A not in text and KEY_B not in text


def test_a_removed_intake_keeps_its_events_until_it_is_back(
        tmp_path: Path, two: tuple[FakeIntake, FakeIntake]) -> None:
    a, b = two
    intakes = {"a": intake_cfg(a, KEY_A), "b": intake_cfg(b, KEY_B)}
    routes = [{"source": ["127.0.0.3/32"], "intake": "b"}, {"intake": "a"}]
    cfg = base_config(tmp_path, intakes=intakes, routes=routes)
    b.set_down(True)
    with Daemon(tmp_path, cfg) as d:
        s3 = Streamer(d.tcp_port, "127.0.0.3", "three")
        s3.start()
        wait_until(lambda: samples(d.status_port).get("spool_events", 0) >= 500, 30,
                   "b's events spooled")
        s3.finish()
        write_toml(d.config_path, base_config(tmp_path, intakes={"a": intakes["a"]},
                                              routes=[{"intake": "a"}]))
        d.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        d.wait_log("reloaded")
        removed = d.wait_log("intake_removed")
        assert removed["intake"] == "b"
        assert d.stop() == 0
        # Kept on its spool and said so at stop; nothing dropped.
        kept = d.events("removed_intake_events_kept")
        assert [(r["intake"], r["events"]) for r in kept] == [("b", s3.sent)]
        assert not d.events("shutdown_dropped")
    assert numbers(b, "three") == []
    # Started again without it: its directory is reported, not read.
    with Daemon(tmp_path, base_config(tmp_path, intakes={"a": intakes["a"]},
                                      routes=[{"intake": "a"}]), file_prefix="again") as d2:
        orphan = d2.wait_log("spool_of_unconfigured_intake")
        assert orphan["spool_dir"].endswith("intakes/b")
    # And with it back (and up): every one of its events arrives, once.
    b.set_down(False)
    with Daemon(tmp_path, cfg, file_prefix="back") as d3:
        wait_until(lambda: len(numbers(b, "three")) >= s3.sent, 30, "b's kept events")
        wait_at_rest(d3.status_port, detail=d3.stderr_text)
    assert sorted(numbers(b, "three")) == list(range(s3.sent))


def test_an_invalid_route_table_is_refused_and_the_running_one_stays(
        tmp_path: Path, two: tuple[FakeIntake, FakeIntake]) -> None:
    a, b = two
    intakes = {"a": intake_cfg(a, KEY_A), "b": intake_cfg(b, KEY_B)}
    cfg = base_config(tmp_path, intakes=intakes,
                      routes=[{"source": ["127.0.0.3/32"], "intake": "b"}, {"intake": "a"}])
    with Daemon(tmp_path, cfg) as d:
        bad = base_config(tmp_path, intakes=intakes, routes=[
            {"intake": "a"},  # a catch-all first: the next can never match
            {"source": ["127.0.0.3/32"], "intake": "b"},
            {"program": ["nginx"], "intake": "nowhere"},
        ])
        write_toml(d.config_path, bad)
        d.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        wait_until(lambda: len(d.events("reload_failed")) >= 3, 10, "one line per problem",
                   detail=d.stderr_text)
        problems = [r["problem"] for r in d.events("reload_failed")]
        assert any(p.startswith("routes[2]") for p in problems)
        assert any(p.startswith("routes[3]") and "nowhere" in p for p in problems)
        # The running table still routes .3 to b.
        s3 = Streamer(d.tcp_port, "127.0.0.3", "three")
        s3.start()
        wait_until(lambda: len(numbers(b, "three")) >= 100, 30, "the old routes in force")
        s3.finish()
        wait_at_rest(d.status_port, s3.sent, detail=d.stderr_text)
        assert numbers(a, "three") == []
