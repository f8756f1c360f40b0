"""The bench's pure parts: how several rounds are told, the interleaving, the concentrator's
rsyslog configuration (rsyslogd -N1 accepts it) and the TLS sink's frame counter.

Nothing here measures or times anything: the bench itself is not run by CI.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import trustme

from bench import concentrator, runs
from bench.__main__ import BURSTS, rotated
from bench.machine import commit, loadavg
from devtools.keys import INTAKE_KEY

pytestmark = pytest.mark.timeout(60)


def test_median_and_spread() -> None:
    assert runs.with_spread([655_738.0, 714_286.0, 769_231.0]) == "714,286 (655,738-769,231)"
    # a round without the figure (failed, or not run) is left out, not counted as 0
    assert runs.with_spread([None, 66.6, 0.0, 65.0, 70.25]) == "66.6 (65.0-70.2)"
    assert runs.with_spread([714_286.0]) == "714,286"
    assert runs.with_spread([None, None]) == "-"
    assert runs.with_spread([]) == "-"
    assert runs.with_spread([37.0, 36.0, 40.0]) == "37 (36-40)"  # counts
    assert runs.with_spread([37.0, 36.0]) == "36.5 (36.0-37.0)"
    assert runs.spread([3.0, 1.0, 2.0, None]) == (2.0, 1.0, 3.0)


def test_ratios_on_medians_with_the_per_round_spread() -> None:
    fwd = [700.0, 800.0, 600.0]
    sng = [350.0, 200.0, 400.0]
    # medians 700 / 350; rounds: 2.0, 4.0, 1.5
    assert runs.ratio_of_medians(fwd, sng) == 2.0
    assert runs.ratio_cell(fwd, sng) == "2.00x (1.50-4.00)"
    # a round where one side failed gives no per-round ratio (700 / median(350, 300))
    assert runs.ratio_cell([700.0, None], [350.0, 300.0]) == "2.15x"
    assert runs.ratio_cell([700.0], []) == "-"


def test_every_round_has_another_order() -> None:
    firsts = [rotated(BURSTS, r)[0] for r in range(len(BURSTS))]
    assert sorted(firsts) == sorted(BURSTS)
    for r in range(7):
        assert sorted(rotated(BURSTS, r)) == sorted(BURSTS)
    assert rotated([], 3) == []


def test_header_figures() -> None:
    rev = commit()
    assert rev == "?" or rev.split()[0].isalnum()
    assert len(loadavg().split()) == 3


def _config(tmp: Path, **kw: Any) -> str:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    (tmp / "work").mkdir(exist_ok=True)
    return concentrator.render_config(port=20516, sink_port=10514, ca_file=tmp / "ca.pem",
                                      workdir=tmp / "work", internal_log=tmp / "internal.log",
                                      **kw)


def test_concentrator_config_is_sekoias(tmp_path: Path) -> None:
    text = _config(tmp_path)
    for piece in ('module(load="imtcp")', 'address="127.0.0.1" port="20516"',
                  'queue.type="LinkedList" queue.filename="sekoia_bench_queue" '
                  'queue.size="100000" queue.saveOnShutdown="on"',
                  'type="omfwd"', 'target="127.0.0.1"', 'port="10514"',
                  'TCP_Framing="octet-counted"', 'StreamDriver="gtls"',
                  'StreamDriverMode="1"', 'StreamDriverAuthMode="x509/name"',
                  f'StreamDriverPermittedPeers="{concentrator.PEER_NAME}"',
                  f'LOG [SEKOIA@53288 intake_key=\\"{INTAKE_KEY}\\"] '
                  "%msg:R,ERE,1,FIELD:^[ \\t]*(.*)$--end%\\n"):
        assert piece in text, piece
    assert "imuxsock" not in text  # the system's /dev/log is never touched
    with pytest.raises(ValueError):
        _config(tmp_path, key="not a key")


needs_rsyslogd = pytest.mark.skipif(
    concentrator.system_rsyslogd() is None,
    reason="requires Debian packages rsyslog and rsyslog-gnutls (the gtls driver)")


@needs_rsyslogd
def test_rsyslogd_accepts_the_concentrator_config(tmp_path: Path) -> None:
    binary = concentrator.system_rsyslogd()
    assert binary is not None
    conf = tmp_path / "rsyslog.conf"
    conf.write_text(_config(tmp_path))
    r = subprocess.run(binary.args(conf, "-N1"), capture_output=True, text=True, timeout=30,
                       env=binary.env)
    assert r.returncode == 0, r.stdout + r.stderr


class _Transport:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def _counter() -> tuple[concentrator._FrameCounter, concentrator._State, _Transport]:
    state = concentrator._State()
    fc = concentrator._FrameCounter(state, b'intake_key="K"')
    t = _Transport()
    fc.connection_made(t)
    return fc, state, t


def _frame(msg: bytes) -> bytes:
    return str(len(msg)).encode() + b" " + msg


def test_sink_counts_octet_counted_frames_across_reads() -> None:
    frames = [_frame(b'<134>1 - h haproxy 1 LOG [SEKOIA@53288 intake_key="K"] m' + bytes(i))
              for i in range(50)]
    frames.append(_frame(b"<86>1 - h sshd 2 LOG - no key here\n"))
    data = b"".join(frames)
    fc, state, t = _counter()
    for i in range(0, len(data), 7):  # every boundary falls somewhere inside a frame
        fc.data_received(data[i : i + 7])
    assert (state.events, state.keyed, state.bytes) == (51, 50, len(data))
    assert not t.closed and not fc.buf


def test_sink_closes_on_a_framing_error() -> None:
    fc, state, t = _counter()
    fc.data_received(b"<134>not octet-counted at all\n")
    assert t.closed and state.bad == 1 and state.events == 0


@needs_rsyslogd
def test_concentrator_forwards_to_the_sink(tmp_path: Path) -> None:
    """rsyslogd with the concentrator's config delivers over TLS to the sink, key inside."""
    binary = concentrator.system_rsyslogd()
    assert binary is not None
    sink = concentrator.Sink(tmp_path).start()
    rs = concentrator.Rsyslog(tmp_path, sink, binary)
    try:
        rs.start()
        with socket.create_connection(("127.0.0.1", rs.port), timeout=10) as s:
            for i in range(100):
                s.sendall(_frame(f"<134>Nov 26 21:58:51 lb1 haproxy[42]:  msg {i}".encode()))
        deadline = time.monotonic() + 30
        st = sink.stats()
        while st["events"] < 100 and time.monotonic() < deadline and rs.proc is not None \
                and rs.proc.poll() is None:
            time.sleep(0.05)
            st = sink.stats()
        assert (st["events"], st["keyed"], st["bad"]) == (100, 100, 0), rs.diagnostics()
        # the concentrator's template: RFC 5424, hostname and app-name kept, leading
        # spaces of MSG stripped
        assert ' lb1 haproxy 42 LOG [SEKOIA@53288 intake_key="' in st["sample"]
        assert '"] msg 0\n' in st["sample"]
    finally:
        rs.stop()
        sink.stop()


def test_sink_is_verified_by_its_peer_name(tmp_path: Path) -> None:
    sink = concentrator.Sink(tmp_path).start()
    try:
        ctx = ssl.create_default_context(cafile=str(sink.ca_file))
        with socket.create_connection(("127.0.0.1", sink.port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname=concentrator.PEER_NAME) as s:
            s.sendall(_frame(b"<134>1 x"))
        deadline = time.monotonic() + 10
        while sink.stats()["events"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sink.stats()["events"] == 1
    finally:
        sink.stop()
