"""HAProxy 3.0 and rsyslog 8.2504 from the Debian 13 chroot (devtools/trixie.py) as test peers.

The engines of the versions Sekoia's HAProxy integration supports (2.9+), next to Debian 12's
2.6 / 8.2302 of tests/realpeers.py. Everything an engine reads or writes (config, unix
sockets, pid file, queues, logs) is in one work directory inside the chroot,
``ROOT/tmp/hf-<pid>-<random>/``, removed at the end; the network is the host's (loopback):
the forwarders, the fake intake and the test's sockets are reached at 127.0.0.1 both ways.

Typical use (a fixture per test module, skipped with one line when there is no chroot)::

    @pytest.fixture
    def trixie(tmp_path: Path) -> Iterator[TrixieRun]:
        with trixie_run(tmp_path) as run:   # pytest.skip("Debian 13 chroot: <why>") if none
            yield run

    def test_x(trixie: TrixieRun) -> None:
        fwd = ...                                       # forwarders on 127.0.0.1
        hap = trixie.haproxy(f'''global
        log 127.0.0.1:{fwd.udp_port} format rfc5424 local0
    ...''')                                             # waits for every bind / dgram-bind
        rs = trixie.rsyslog('action(type="omfwd" target=["127.0.0.1", "127.0.0.1"] ...)')
        send_logger(rs.socket_path, "haproxy", "x")     # tests.realpeers: host path works
        hap.stop(); rs.kill()                           # or leave them: stopped at the end

In an engine's config, paths are in-chroot paths: ``trixie.inner_path("admin.sock")``
(``/tmp/hf-…/admin.sock``); the host reaches the same file at ``trixie.host_path(...)``.
At the end (``close()``, the ``with``) every engine still running is stopped (SIGTERM, then
SIGKILL), the work directory is copied to ``keep`` (the test's tmp_path: the configs and
outputs stay there to look at, sockets left out) and removed from the chroot.

Scale-out helpers for HAProxy 3.0 ``mode log`` backends and ``log-forward``:
``log_backend`` and ``log_forward`` write those sections; ``haproxy_cli`` talks to a
``stats socket`` (``show servers state``, ``show stat``, ``disable server``...).
"""

from __future__ import annotations

import contextlib
import functools
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal

import pytest

from devtools.probe import wait_until
from devtools.trixie import PACKAGES, Trixie, chroot
from tests.realpeers import end_process, port_listening

__all__ = [
    "ChrootHaproxy", "ChrootProcess", "ChrootRsyslog", "TrixieRun", "haproxy_cli",
    "log_backend", "log_forward", "trixie_or_skip", "trixie_run", "udp_bound",
]

HAPROXY = "/usr/sbin/haproxy"
RSYSLOGD = "/usr/sbin/rsyslogd"

#: (what is awaited, a condition): how an engine says it is ready.
Ready = tuple[str, Callable[[], bool]]

# AF_UNIX sun_path is 108 bytes on Linux, including the NUL (host side: the host path).
_MAX_UNIX_PATH = 100


def trixie_or_skip(packages: Iterable[str] = PACKAGES) -> Trixie:
    """The chroot (built on first use), or ``pytest.skip`` with one line saying why not."""
    found, reason = chroot(packages)
    if found is None:
        pytest.skip(f"Debian 13 chroot (HAProxy 3.0, rsyslog 8.2504) unavailable: {reason}")
    return found


@contextlib.contextmanager
def trixie_run(keep: Path | None = None,
               packages: Iterable[str] = PACKAGES) -> Iterator[TrixieRun]:
    """A ``TrixieRun`` closed at the end (skips the test when there is no chroot)."""
    run = TrixieRun(trixie_or_skip(packages), keep)
    try:
        yield run
    finally:
        run.close()


# ----------------------------------------------------------------------------- sockets


def udp_bound(port: int) -> bool:
    """True when some UDP socket is bound to ``port`` (any address), read from /proc."""
    wanted = f":{port:04X}"
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        if any(len(f := ln.split()) > 1 and f[1].endswith(wanted) for ln in lines):
            return True
    return False


def haproxy_cli(socket_path: Path | str, command: str, timeout: float = 5.0) -> str:
    """One command on HAProxy's ``stats socket`` (its HOST path); the answer as text."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(socket_path))
        s.sendall(command.encode() + b"\n")
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    return b"".join(chunks).decode(errors="replace")


# ----------------------------------------------------------------------------- processes


class ChrootProcess:
    """One engine in the foreground inside the chroot, its output in ``output_path``."""

    name = "process"

    def __init__(self, run: TrixieRun, argv: Sequence[str], output_name: str) -> None:
        self.run = run
        self.argv = list(argv)  # in-chroot command line
        self.output_path = run.host_path(output_name)
        self.proc: subprocess.Popen[bytes] | None = None
        self._output: object = None

    def _spawn(self) -> None:
        out = self.output_path.open("ab")
        self._output = out
        self.proc = self.run.trixie.popen(*self.argv, stdout=out, stderr=subprocess.STDOUT)
        self.run.processes.append(self)

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self, limit: int = 6000) -> str:
        try:
            text = self.output_path.read_text(errors="replace")
        except OSError:
            return ""
        return text[-limit:]

    def send_signal(self, sig: int) -> None:
        """e.g. SIGSTOP / SIGCONT (a frozen engine), SIGHUP."""
        if self.running():
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def kill(self) -> int | None:
        """SIGKILL, as a crash: nothing flushed, nothing closed cleanly."""
        return self.stop(signal.SIGKILL)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Send ``sig``, wait up to ``timeout`` s, then SIGKILL. The exit code."""
        proc = self.proc
        if proc is None:
            return None
        end_process(proc, sig, timeout)
        close = getattr(self._output, "close", None)
        if close is not None:
            close()
        return proc.returncode

    def _fail(self, message: str) -> None:
        self.stop()
        raise RuntimeError(f"{self.name} (chroot {self.run.trixie.root}): {message}\n"
                           f"--- output ---\n{self.output()}")

    def _wait_ready(self, ready: list[Ready], timeout: float) -> None:
        """Wait until every (what, condition) holds, or fail with the engine's output."""
        for what, cond in ready:
            def done(c: Callable[[], bool] = cond) -> bool:
                return not self.running() or c()

            with contextlib.suppress(AssertionError):  # said below, with the output
                wait_until(done, timeout, what)
            if not self.running():
                code = self.proc.returncode if self.proc else "?"
                self._fail(f"exited early with code {code} (waiting for {what})")
            if not cond():
                self._fail(f"not ready within {timeout} s: {what}")

    def __enter__(self) -> ChrootProcess:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


_BIND_RE = re.compile(r"^\s*(bind|dgram-bind)\s+(\S+)", re.MULTILINE)
_LOOPBACK = ("127.", "localhost:", "[::1]:", "::1:")


def _binds(cfg_text: str) -> list[tuple[Literal["tcp", "udp"], int]]:
    """(kind, port) of every ``bind`` / ``dgram-bind`` line; loopback only (ValueError)."""
    found: list[tuple[Literal["tcp", "udp"], int]] = []
    for keyword, addr in _BIND_RE.findall(cfg_text):
        proto, _, host_port = addr.rpartition("@")
        if not host_port.startswith(_LOOPBACK):
            raise ValueError(f"haproxy test config: {keyword} {addr}: loopback only")
        port = host_port.rsplit(":", 1)[1]
        if not port.isdigit():
            continue  # a range or a unix socket: nothing to wait for
        udp = keyword == "dgram-bind" or proto.startswith("udp")
        found.append(("udp" if udp else "tcp", int(port)))
    return found


class ChrootHaproxy(ChrootProcess):
    """``haproxy -db -f /tmp/hf-…/NAME.cfg`` from the chroot, checked with ``-c`` first.

    ``start()`` waits for every ``bind`` (TCP LISTEN) and ``dgram-bind`` (UDP bound) port of
    the config, or ``wait_tcp`` / ``wait_udp`` when given. ``stop()`` is SIGTERM (hard stop);
    ``stop(signal.SIGUSR1)`` a soft stop. The config must keep every bind on loopback and
    have no ``daemon``, ``chroot``, ``user``/``group`` or system paths (/run, /dev/log).
    """

    name = "haproxy 3.0"

    def __init__(self, run: TrixieRun, cfg_text: str, *, name: str = "haproxy",
                 wait_tcp: Sequence[int] | None = None, wait_udp: Sequence[int] | None = None,
                 start: bool = True, timeout: float = 10.0) -> None:
        binds = _binds(cfg_text)
        self.cfg_inner = run.write(f"{name}.cfg", cfg_text if cfg_text.endswith("\n")
                                   else cfg_text + "\n")
        self.cfg_path = run.host_path(f"{name}.cfg")
        super().__init__(run, [HAPROXY, "-db", "-f", self.cfg_inner], f"{name}.out")
        self.wait_tcp = list(wait_tcp) if wait_tcp is not None else [
            p for k, p in binds if k == "tcp"]
        self.wait_udp = list(wait_udp) if wait_udp is not None else [
            p for k, p in binds if k == "udp"]
        if start:
            self.start(timeout)

    def check_config(self) -> None:
        res = self.run.trixie.run(HAPROXY, "-c", "-f", self.cfg_inner, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"haproxy 3.0 -c rejected {self.cfg_path}:\n{res.stdout}"
                               f"{res.stderr}\n--- config ---\n{self.cfg_path.read_text()}")

    def start(self, timeout: float = 10.0) -> None:
        self.check_config()
        self._spawn()
        ready: list[Ready] = [
            (f"HAProxy listening on TCP port {p}", functools.partial(port_listening, p))
            for p in self.wait_tcp]
        ready += [(f"HAProxy bound to UDP port {p}", functools.partial(udp_bound, p))
                  for p in self.wait_udp]
        if not ready:
            ready = [("HAProxy up", self.running)]
        self._wait_ready(ready, timeout)

    def cli(self, command: str, socket_name: str = "admin.sock") -> str:
        """A command on the config's ``stats socket {run.inner_path(socket_name)}``."""
        return haproxy_cli(self.run.host_path(socket_name), command)

    def __enter__(self) -> ChrootHaproxy:
        return self


class ChrootRsyslog(ChrootProcess):
    """A private ``rsyslogd -n`` from the chroot: ``body`` (RainerScript: inputs, rules,
    actions) between a preamble and a catch-all file, checked with ``-N1`` first.

    Preamble: ``workDirectory`` = ``work/`` of the run (disk queues), internal messages
    through the rules, ``maxMessageSize`` 64k, and (``unix_socket``) an imuxsock input on
    ``log.sock`` without rate limiting, the system socket unused. ``socket_path`` is its HOST
    path (for ``send_logger`` of tests.realpeers, or HAProxy on the host), ``socket_inner``
    the path for HAProxy in the chroot (``log {socket_inner} local0``). With ``all_log``,
    every message also goes to ``all.log`` (``all_log_path``), unless the body stops it.
    ``start()`` waits for the socket and for every ``wait_tcp`` port (imtcp, imrelp inputs
    of the body).
    """

    name = "rsyslogd 8.2504"

    def __init__(self, run: TrixieRun, body: str = "", *, name: str = "rsyslog",
                 unix_socket: bool = True, all_log: bool = True,
                 wait_tcp: Sequence[int] = (), start: bool = True,
                 timeout: float = 10.0) -> None:
        self.workdir_inner = run.mkdir(f"{name}-work")
        self.socket_inner = run.inner_path(f"{name}.sock")
        self.socket_path = run.host_path(f"{name}.sock")
        self.all_log_path = run.host_path(f"{name}-all.log")
        self.pid_inner = run.inner_path(f"{name}.pid")
        if unix_socket and len(str(self.socket_path)) > _MAX_UNIX_PATH:
            raise ValueError(f"{self.socket_path}: too long for a unix socket seen from the "
                             f"host; set FORWARDER_TEST_TRIXIE to a shorter directory")
        preamble = f"""# Written by tests/trixie_peers.py: a private rsyslogd 8.2504 in the chroot.
global(workDirectory="{self.workdir_inner}" processInternalMessages="on" maxMessageSize="64k")
"""
        if unix_socket:
            preamble += f"""module(load="imuxsock" SysSock.Use="off")
input(type="imuxsock" Socket="{self.socket_inner}" RateLimit.Interval="0" CreatePath="on")
"""
        tail = (f'action(type="omfile" file="{run.inner_path(self.all_log_path.name)}" '
                'template="RSYSLOG_FileFormat")\n' if all_log else "")
        text = f"{preamble}\n# ---- body ----\n{body}\n# ---- end of body ----\n{tail}"
        self.conf_inner = run.write(f"{name}.conf", text)
        self.conf_path = run.host_path(f"{name}.conf")
        self.unix_socket = unix_socket
        self.wait_tcp = list(wait_tcp)
        super().__init__(run, [RSYSLOGD, "-n", "-f", self.conf_inner, "-i", self.pid_inner],
                         f"{name}.out")
        if start:
            self.start(timeout)

    def check_config(self) -> None:
        res = self.run.trixie.run(RSYSLOGD, "-N1", "-f", self.conf_inner, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"rsyslogd 8.2504 -N1 rejected {self.conf_path}:\n{res.stdout}"
                               f"{res.stderr}\n--- config ---\n{self.conf_path.read_text()}")

    def start(self, timeout: float = 10.0) -> None:
        """Start (again: the same work directory, hence the same disk queues)."""
        self.check_config()
        if self.unix_socket:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
        self._spawn()
        ready: list[Ready] = []
        if self.unix_socket:
            ready.append((f"rsyslog's socket {self.socket_path}", self.socket_path.exists))
        ready += [(f"rsyslog listening on TCP port {p}", functools.partial(port_listening, p))
                  for p in self.wait_tcp]
        if not ready:
            ready = [("rsyslog up", self.running)]
        self._wait_ready(ready, timeout)

    def all_log(self) -> bytes:
        try:
            return self.all_log_path.read_bytes()
        except FileNotFoundError:
            return b""

    def __enter__(self) -> ChrootRsyslog:
        return self


# ----------------------------------------------------------------------------- a test's run


class TrixieRun:
    """One test's work directory in the chroot and the engines started there."""

    def __init__(self, trixie: Trixie, keep: Path | None = None) -> None:
        self.trixie = trixie
        self.keep = keep
        self.dir = trixie.workdir()  # host path
        self.inner = trixie.inner_path(self.dir)  # "/tmp/hf-<pid>-<random>"
        self.processes: list[ChrootProcess] = []
        self._closed = False

    def host_path(self, name: str) -> Path:
        """``name`` (relative: in the work directory; absolute: an in-chroot path, as
        ``inner_path`` gives) as the host sees it."""
        if name.startswith("/"):
            return self.trixie.host_path(name)
        return self.dir / name

    def inner_path(self, name: str) -> str:
        """``name`` (relative) in the work directory, as the chroot's engines see it."""
        if name.startswith("/"):
            raise ValueError(f"{name!r}: a name in the work directory is relative")
        return f"{self.inner}/{name}"

    def write(self, name: str, text: str) -> str:
        """Write a file in the work directory; its in-chroot path."""
        path = self.host_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return self.inner_path(name)

    def mkdir(self, name: str) -> str:
        self.host_path(name).mkdir(parents=True, exist_ok=True)
        return self.inner_path(name)

    def haproxy(self, cfg_text: str, **kwargs: object) -> ChrootHaproxy:
        """Start HAProxy 3.0 on ``cfg_text`` (see ChrootHaproxy for the keywords)."""
        return ChrootHaproxy(self, cfg_text, **kwargs)  # type: ignore[arg-type]

    def rsyslog(self, body: str = "", **kwargs: object) -> ChrootRsyslog:
        """Start rsyslogd 8.2504 with ``body`` (see ChrootRsyslog for the keywords)."""
        return ChrootRsyslog(self, body, **kwargs)  # type: ignore[arg-type]

    def close(self) -> None:
        """Stop what still runs, keep the files in ``keep``, remove the work directory."""
        if self._closed:
            return
        self._closed = True
        for p in reversed(self.processes):
            with contextlib.suppress(Exception):
                p.stop(timeout=5)
        if self.keep is not None:
            with contextlib.suppress(OSError):
                shutil.copytree(self.dir, self.keep / f"trixie-{self.dir.name}",
                                ignore=_not_regular, dirs_exist_ok=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> TrixieRun:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _not_regular(directory: str, names: list[str]) -> list[str]:
    """copytree's ignore: sockets, fifos and devices are not copied."""
    base = Path(directory)
    return [n for n in names if not ((base / n).is_file() or (base / n).is_dir())]


# ----------------------------------------------------------------------------- config snippets


def log_backend(name: str, servers: Sequence[tuple[str, int]], *,
                proto: Literal["tcp", "udp"] = "tcp", balance: str = "roundrobin",
                check: bool = False, extra: str = "") -> str:
    """A HAProxy 2.9+ ``mode log`` backend balancing per message over ``servers`` (the
    forwarders: (host, port)), ``balance`` roundrobin | random | log-hash ... | sticky.
    TCP servers use octet counting (``tcp@`` + ``log-proto octet-count``); UDP ones ``udp@``.
    ``check``: TCP health checks (``check``, 1 s). Reached from ``log backend@NAME ...``.
    """
    lines = [f"backend {name}", "    mode log", f"    balance {balance}"]
    if extra:
        lines.append(extra.rstrip("\n"))
    for i, (host, port) in enumerate(servers):
        if proto == "tcp":
            line = f"    server s{i} tcp@{host}:{port} log-proto octet-count"
        else:
            line = f"    server s{i} udp@{host}:{port}"
        if check:
            line += " check inter 1s"
        lines.append(line)
    return "\n".join(lines) + "\n"


def log_forward(name: str, *, tcp: Sequence[int] = (), udp: Sequence[int] = (),
                log: str = "", extra: str = "") -> str:
    """A HAProxy ``log-forward`` section: ``bind 127.0.0.1:P`` (TCP, octet-counted or LF,
    as HAProxy detects) for each of ``tcp``, ``dgram-bind 127.0.0.1:P`` for each of ``udp``,
    and the ``log`` line(s), e.g. ``log backend@fwds local0``."""
    lines = [f"log-forward {name}"]
    lines += [f"    bind 127.0.0.1:{p}" for p in tcp]
    lines += [f"    dgram-bind 127.0.0.1:{p}" for p in udp]
    if extra:
        lines.append(extra.rstrip("\n"))
    lines += [f"    {ln.strip()}" for ln in log.strip().splitlines()]
    return "\n".join(lines) + "\n"
