"""rsyslog configured as Sekoia's concentrator, and the TLS sink it forwards to.

Sekoia's own forwarder (SEKOIA-IO/sekoiaio-docker-concentrator, files rsyslog.conf and
template.j2) is rsyslog: an imtcp input per intake key, bound to a ruleset that has its own
LinkedList queue (a queue file name, so disk-assisted, `queue.size` = MEMORY_MESSAGES (100,000)
divided by the number of intakes, saved on shutdown), and one omfwd action over TLS (gtls,
StreamDriverMode 1, x509/name), octet-counted, with an RFC 5424 template that carries the intake
key in the structured data:

    <PRI>1 TIMEGENERATED HOSTNAME APP-NAME PROCID LOG [SEKOIA@53288 intake_key="KEY"] MSG

Here the same configuration (render_config) runs with `rsyslogd -n` on the loopback: the
input on a free 127.0.0.1 port, the output to `Sink`, a small TLS server in its own process
with a trustme CA that counts octet-counted frames (and the frames that carry the key).
Only what the burst goes through is loaded: no imuxsock (the system's /dev/log is not
touched), imudp, omrelp nor impstats. The concentrator has no program filter: it forwards
every message, so the sink must count all frames of the stream, not only the HAProxy ones.

rsyslogd is the system's (Debian 12: 8.2302 with rsyslog-gnutls) when it has the gtls driver;
otherwise Debian's rsyslog and rsyslog-gnutls are extracted into .bench-cache/rsyslog with
apt-get download + dpkg -x, as bench.suts does for syslog-ng.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import subprocess
import threading
import time
from array import array
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from devtools.keys import INTAKE_KEY

from . import procs, suts
from .control import Child
from .intake import answer_commands

#: A fake key shaped like Sekoia's (the concentrator checks ^[a-zA-Z0-9]{16}).
KEY = INTAKE_KEY
#: The sink's certificate name, which omfwd checks (StreamDriverAuthMode="x509/name").
PEER_NAME = "intake.sekoia.bench.invalid"
#: The concentrator's per-intake queue: MEMORY_MESSAGES (100,000) / one intake.
QUEUE_SIZE = 100_000

RSYSLOG_PACKAGES = ("rsyslog", "rsyslog-gnutls")
RSYSLOG_DIR = suts.CACHE / "rsyslog"
RSYSLOG_ROOT = RSYSLOG_DIR / "root"
SYSTEM_RSYSLOGD = Path("/usr/sbin/rsyslogd")

CONFIG = """\
# The Sekoia concentrator's rsyslog (SEKOIA-IO/sekoiaio-docker-concentrator: rsyslog.conf and
# template.j2, omfwd branch), for one intake, on the loopback. Written by bench/concentrator.py.
global(
    defaultNetstreamDriverCAFile="{ca_file}"
    maxMessageSize="250k"
    umask="0022"
    workDirectory="{workdir}"
)

module(load="imtcp")

main_queue(
    queue.filename="sekoia_queue"
    queue.type="LinkedList"
    queue.maxDiskSpace="{disk_space}"
    queue.saveOnShutdown="on"
)

input(type="imtcp" address="127.0.0.1" port="{port}" ruleset="ruleset-{name}" \
name="input-{name}")

template(name="SEKOIAIO_{name}_Template" type="string" string="<%pri%>1 \
%timegenerated:::date-rfc3339% %hostname% %app-name% %procid% LOG [SEKOIA@53288 \
intake_key=\\"{key}\\"] %msg:R,ERE,1,FIELD:^[ \\t]*(.*)$--end%\\n")

ruleset(name="ruleset-{name}" queue.type="LinkedList" queue.filename="sekoia_{name}_queue" \
queue.size="{queue_size}" queue.saveOnShutdown="on") {{
action(
    name="output-{name}"
    type="omfwd"
    protocol="tcp"
    target="127.0.0.1"
    port="{sink_port}"
    TCP_Framing="octet-counted"
    StreamDriver="gtls"
    StreamDriverMode="1"
    StreamDriverAuthMode="x509/name"
    StreamDriverPermittedPeers="{peer}"
    Template="SEKOIAIO_{name}_Template"
    )
}}

# rsyslogd's own messages (the default ruleset gets nothing else): for diagnostics.
*.* action(type="omfile" file="{internal_log}")
"""


def render_config(*, port: int, sink_port: int, ca_file: Path, workdir: Path,
                  internal_log: Path, key: str = KEY, peer: str = PEER_NAME,
                  queue_size: int = QUEUE_SIZE, name: str = "bench",
                  disk_space: str = "32g") -> str:
    """The concentrator's configuration for one intake named `name` (lower case, as its
    generator makes it), listening on 127.0.0.1:`port`, forwarding to 127.0.0.1:`sink_port`."""
    if not key.isalnum() or len(key) < 16:
        raise ValueError("an intake key is at least 16 alphanumeric characters")
    return CONFIG.format(port=port, sink_port=sink_port, ca_file=ca_file, workdir=workdir,
                         internal_log=internal_log, key=key, peer=peer, queue_size=queue_size,
                         name=name.lower(), disk_space=disk_space)


# -- finding rsyslogd -----------------------------------------------------------------------


class RsyslogUnavailable(Exception):
    pass


class Binary:
    """How to run an rsyslogd: its path, its module folder (-M) and its environment."""

    def __init__(self, path: Path, module_dir: Path | None, env: dict[str, str]) -> None:
        self.path = path
        self.module_dir = module_dir
        self.env = env

    def args(self, conf: Path, *more: str) -> list[str]:
        base = [str(self.path)]
        if self.module_dir is not None:
            base += ["-M", str(self.module_dir)]
        return [*base, "-f", str(conf), *more]

    def version(self) -> str:
        r = suts._run([str(self.path), "-v"], 30, env=self.env)
        first = r.stdout.splitlines()[0] if r.returncode == 0 and r.stdout else "?"
        return " ".join(first.removesuffix("compiled with:").split())


def _gtls_in(folder: Path) -> bool:
    return (folder / "lmnsd_gtls.so").exists() and (folder / "imtcp.so").exists()


def system_rsyslogd() -> Binary | None:
    """The installed rsyslogd, if it has the gtls driver (Debian package rsyslog-gnutls)."""
    if not SYSTEM_RSYSLOGD.exists():
        return None
    for folder in suts.lib_dirs(Path("/")):
        if _gtls_in(folder / "rsyslog"):
            return Binary(SYSTEM_RSYSLOGD, None, dict(os.environ))
    return None


def ensure_rsyslog(log: Any = print) -> tuple[Binary, dict[str, Any]]:
    """The system's rsyslogd with gtls, or Debian's extracted into .bench-cache/rsyslog."""
    found = system_rsyslogd()
    if found is not None:
        return found, {"from": "system", "path": str(found.path)}
    info = suts.extract_debs(RSYSLOG_PACKAGES, RSYSLOG_DIR, log, RsyslogUnavailable)
    binary = RSYSLOG_ROOT / "usr/sbin/rsyslogd"
    modules = next((d / "rsyslog" for d in suts.lib_dirs(RSYSLOG_ROOT)
                    if _gtls_in(d / "rsyslog")), None)
    if not binary.exists() or modules is None:
        raise RsyslogUnavailable(f"no rsyslogd with lmnsd_gtls.so under {RSYSLOG_ROOT}")
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join(str(d) for d in suts.lib_dirs(RSYSLOG_ROOT))
    return Binary(binary, modules, env), {"from": "extracted", "path": str(binary), **info}


# -- the system under test ------------------------------------------------------------------


class Rsyslog:
    """One `rsyslogd -n` with the concentrator's configuration, forwarding to `sink`."""

    name = "rsyslog concentrator"

    def __init__(self, tmp: Path, sink: Sink, binary: Binary) -> None:
        self.tmp = tmp / f"rsyslog-{time.monotonic_ns()}"
        self.workdir = self.tmp / "work"
        self.workdir.mkdir(parents=True)
        self.binary = binary
        self.port = suts.free_port()
        self.conf_path = self.tmp / "rsyslog.conf"
        self.conf_path.write_text(render_config(
            port=self.port, sink_port=sink.port, ca_file=sink.ca_file, workdir=self.workdir,
            internal_log=self.tmp / "internal.log"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.queue_peak = 0  # largest size of the queue files seen while running (bytes)
        self._stop_watch = threading.Event()
        self._watch: threading.Thread | None = None

    def expected(self, count: int, _haproxy: int) -> int:
        """No program filter in the concentrator: every frame of the stream is forwarded."""
        return count

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def syntax_check(self) -> str | None:
        r = suts._run(self.binary.args(self.conf_path, "-N1"), 30, env=self.binary.env)
        return None if r.returncode == 0 else (r.stderr or r.stdout).strip()[-1500:]

    def start(self, timeout: float = 30.0) -> Rsyslog:
        self._out = (self.tmp / "stderr.log").open("wb")
        self.proc = proc = procs.spawn(
            self.binary.args(self.conf_path, "-n", "-i", str(self.tmp / "rsyslogd.pid")),
            stdout=self._out, stderr=subprocess.STDOUT, env=self.binary.env)
        if not procs.wait_until(lambda: suts.listening(self.port) or proc.poll() is not None,
                                timeout, 0.01) or proc.poll() is not None:
            raise RuntimeError(f"rsyslogd did not start: {self.diagnostics()[-1500:]}")
        self._watch = threading.Thread(target=self._watch_queue, daemon=True)
        self._watch.start()
        return self

    def _watch_queue(self) -> None:
        # A disk-assisted queue writes its files when it is full, and deletes them once
        # drained: look while the burst runs (a glob of one folder, 5 times a second).
        while not self._stop_watch.wait(0.2):
            self.queue_peak = max(self.queue_peak, self.queue_files())

    def diagnostics(self) -> str:
        out = []
        for name in ("stderr.log", "internal.log"):
            p = self.tmp / name
            if p.exists():
                out.append(p.read_text(errors="replace"))
        return "\n".join(out)

    def queue_files(self) -> int:
        """Bytes of queue files in the work directory now (the disk-assisted queue spilled)."""
        total = 0
        for p in self.workdir.glob("sekoia_*"):
            with contextlib.suppress(OSError):
                total += p.stat().st_size
        return total

    def burst_notes(self, stats: dict[str, Any]) -> list[str]:
        """What the sink saw beside the count, and whether the queue went to disk."""
        notes = []
        if stats.get("keyed", 0) != stats.get("events", 0):
            notes.append(f"{stats['events'] - stats.get('keyed', 0)} frames without the key")
        if stats.get("bad"):
            notes.append(f"{stats['bad']} connections with a framing error")
        spilled = max(self.queue_peak, self.queue_files())
        if spilled:
            notes.append(f"its queue went to disk (up to {spilled / 2**20:.0f} MiB of queue "
                         "files seen)")
        return notes

    def stop(self) -> int:
        self._stop_watch.set()
        if self._watch is not None:
            self._watch.join(5)
        rc = procs.stop(self.proc) if self.proc is not None else 0
        self._out.close()
        return rc


# -- the TLS sink ---------------------------------------------------------------------------


class _State:
    def __init__(self) -> None:
        self.reset("count")

    def reset(self, _mode: str) -> None:
        self.events = 0
        self.keyed = 0  # frames that carry the intake key
        self.bad = 0  # connections closed on a framing error
        self.connections = 0
        self.bytes = 0
        self.first_t = 0.0
        self.last_t = 0.0
        self.sample = b""
        self.timeline: array[float] = array("d")
        self.cpu0 = os.times()

    def snapshot(self) -> dict[str, Any]:
        t = os.times()
        return {"events": self.events, "keyed": self.keyed, "bad": self.bad,
                "connections": self.connections, "bytes": self.bytes,
                "first_t": self.first_t, "last_t": self.last_t,
                "requests": 0, "leaked": 0,
                "sample": self.sample[:400].decode("utf-8", "replace"),
                "cpu": (t.user - self.cpu0.user) + (t.system - self.cpu0.system)}


class _FrameCounter(asyncio.Protocol):
    """Counts RFC 6587 octet-counted frames (`LEN SP MSG`), and those holding `mark`."""

    def __init__(self, state: _State, mark: bytes) -> None:
        self.state = state
        self.mark = mark
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.state.connections += 1

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        end = len(buf)
        pos = n = 0
        while pos < end:
            sp = buf.find(b" ", pos, pos + 11)
            if sp < 0:
                if end - pos > 10:
                    self._bad()
                    return
                break
            try:
                nxt = sp + 1 + int(buf[pos:sp])
            except ValueError:
                self._bad()
                return
            if nxt > end:
                break
            pos = nxt
            n += 1
        if not n:
            return
        st = self.state
        if not st.sample:
            st.sample = bytes(buf[:pos])
        st.keyed += buf.count(self.mark, 0, pos)
        del buf[:pos]
        now = time.monotonic()
        st.events += n
        st.bytes += pos
        if not st.first_t:
            st.first_t = now
        st.last_t = now
        st.timeline.append(now)
        st.timeline.append(float(st.events))

    def _bad(self) -> None:
        self.state.bad += 1
        self.buf.clear()
        if self.transport is not None:
            self.transport.close()


def serve(conn: Connection, cert_pem: bytes, key_pem: bytes, tmpdir: str, mark: bytes) -> None:
    """Process entry point: bind, report the port, serve until told to stop."""
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    asyncio.run(_main(conn, cert_pem, key_pem, tmpdir, mark))


async def _main(conn: Connection, cert_pem: bytes, key_pem: bytes, tmpdir: str,
                mark: bytes) -> None:
    cert, key = os.path.join(tmpdir, "sink-cert.pem"), os.path.join(tmpdir, "sink-key.pem")
    Path(cert).write_bytes(cert_pem)
    Path(key).write_bytes(key_pem)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    state = _State()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _FrameCounter(state, mark), "127.0.0.1", 0,
                                      ssl=ctx, backlog=128, reuse_address=True)
    conn.send(("port", server.sockets[0].getsockname()[1]))
    await answer_commands(conn, state)
    server.close()


class Sink(Child):
    """The driver's side of the TLS sink (bench.control.Child), so that bench.runs.burst
    measures through it as through the intake."""

    def __init__(self, tmp: Path, key: str = KEY) -> None:
        super().__init__(tmp, "bench TLS sink", "sink-ca.pem", PEER_NAME)
        self.mark = f'[SEKOIA@53288 intake_key="{key}"]'.encode()

    def start(self) -> Sink:
        self._spawn(serve, "bench-tls-sink", self.mark)
        return self
