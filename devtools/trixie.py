"""A Debian 13 (trixie) chroot holding HAProxy 3.0, rsyslog 8.2504 and rsyslog-relp: the
engines of the versions Sekoia's HAProxy integration supports, run by tests from the chroot.

Built once and reused between tests and runs::

    debootstrap --variant=minbase trixie DIR http://deb.debian.org/debian      (~35 s here)
    chroot DIR apt-get install -y --no-install-recommends haproxy rsyslog rsyslog-relp (~4 s)

``DIR`` is a cache outside the repository, ``/var/cache/haproxy-forwarder-tests/trixie`` (or
``$FORWARDER_TEST_TRIXIE``; not ``HAPROXY_FORWARDER_*``: the daemon refuses any variable of
its own prefix that names no setting, and tests pass their environment on to it). The build
goes to ``DIR.tmp`` and is renamed to ``DIR`` once complete, under a lock (``DIR.lock``, so
two pytest processes never build at once; the second waits and reuses). A marker file inside
(``DIR/.haproxy-forwarder-trixie.json``) records the suite, the mirror, when, how long, and
the version of every package asked for; without it ``DIR`` does not count as built. The
build's output goes to ``DIR.build.log``.

Nothing is mounted: neither the install nor the engines need /proc, /sys or /dev beyond the
device nodes debootstrap creates (tried), so no mount can be left behind. (Before removing a
tree, any mount found under it is unmounted all the same.) Services are never started in the
chroot (``policy-rc.d`` answers 101).

An engine runs as ``chroot DIR /usr/sbin/haproxy -f /tmp/hf-…/haproxy.cfg``: the chroot
shares the host's network (loopback works both ways) and process space (the pid of the
``Popen`` is the engine's: chroot execs it). Its files (config, unix sockets, queues, logs)
live under ``DIR/tmp/hf-<pid>-<random>/`` (``Trixie.workdir()``), named inside the chroot
by their in-chroot path (``Trixie.inner_path``) and seen from the host under ``DIR``
(``Trixie.host_path``). tests/trixie_peers.py starts and stops the engines on top of this.

Use::

    trixie, reason = chroot()         # built if need be; cached per process
    if trixie is None:
        pytest.skip(f"Debian 13 chroot: {reason}")   # one line: no root, no debootstrap,
                                                     # the mirror unreachable, ...
    trixie.version("haproxy")         # "3.0.11-1+deb13u4"

From a shell (``.ci/prepare-trixie``): ``python3 -m devtools.trixie`` builds it if needed and
prints the versions (standard library only: runs before the venv exists).
``FORWARDER_TEST_TRIXIE_BUILD=0``: never build (tests skip when it is not there);
``FORWARDER_TEST_TRIXIE_MIRROR``: another Debian mirror.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_DIR", "DIR_ENV", "PACKAGES", "SUITE", "Trixie", "Unavailable", "chroot", "ensure",
    "location", "mirror",
]

SUITE = "trixie"
DIR_ENV = "FORWARDER_TEST_TRIXIE"
MIRROR_ENV = "FORWARDER_TEST_TRIXIE_MIRROR"
BUILD_ENV = "FORWARDER_TEST_TRIXIE_BUILD"
DEFAULT_DIR = Path("/var/cache/haproxy-forwarder-tests/trixie")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
#: What the chroot holds for the tests; `ensure(packages=...)` adds more in place.
PACKAGES: tuple[str, ...] = ("haproxy", "rsyslog", "rsyslog-relp")
MARKER = ".haproxy-forwarder-trixie.json"
MARKER_FORMAT = 1
#: Work directories of test processes under DIR/tmp: hf-<pid>-<random>.
WORK_PREFIX = "hf-"

DEBOOTSTRAP_TIMEOUT = 1200.0
APT_TIMEOUT = 900.0
LOCK_TIMEOUT = 1800.0  # another process building: wait this long at most
MIRROR_TIMEOUT = 10.0

#: The environment of every command run inside the chroot: nothing of the caller's but a
#: proxy, so a variable of the host never changes what an engine does.
_CHROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
}
_PROXY_VARS = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")

Log = Callable[[str], None]


class Unavailable(Exception):
    """The chroot cannot be had here; ``str()`` is one line saying why."""


def location() -> Path:
    """Where the chroot is (built or not): $FORWARDER_TEST_TRIXIE or the default."""
    return Path(os.environ.get(DIR_ENV) or DEFAULT_DIR).absolute()


def mirror() -> str:
    return (os.environ.get(MIRROR_ENV) or DEFAULT_MIRROR).rstrip("/")


def chroot_env() -> dict[str, str]:
    """The environment for commands inside the chroot (a proxy of the caller's kept)."""
    env = dict(_CHROOT_ENV)
    env.update({k: v for k, v in os.environ.items() if k in _PROXY_VARS})
    return env


def _chroot_exe() -> str:
    found = shutil.which("chroot") or shutil.which("chroot", path="/usr/sbin:/sbin")
    if found is None:
        raise Unavailable("no chroot command (Debian package coreutils)")
    return found


# ----------------------------------------------------------------------------- the chroot


@dataclass(frozen=True)
class Trixie:
    """A built chroot: where it is and what it holds (from its marker)."""

    root: Path
    packages: dict[str, str]  # package -> installed version
    marker: dict[str, Any] = field(repr=False, default_factory=dict)

    def version(self, package: str) -> str:
        return self.packages[package]

    def describe(self) -> str:
        """``haproxy 3.0.11-1+deb13u4, rsyslog 8.2504.0-1+deb13u2, ...``"""
        return ", ".join(f"{p} {v}" for p, v in self.packages.items())

    def argv(self, *command: str) -> list[str]:
        """``chroot ROOT command...``: ``command[0]`` is a path inside the chroot."""
        return [_chroot_exe(), str(self.root), *command]

    def host_path(self, inner: str | Path) -> Path:
        """The host's path of ``inner``, a path inside the chroot ("/tmp/hf-1/x.cfg")."""
        inner = str(inner)
        if not inner.startswith("/"):
            raise ValueError(f"{inner!r}: an in-chroot path is absolute")
        return self.root / inner.lstrip("/")

    def inner_path(self, host: str | Path) -> str:
        """The in-chroot path of ``host``, a host path under ``root`` (ValueError otherwise)."""
        rel = Path(host).absolute().relative_to(self.root)
        return "/" + rel.as_posix() if rel.parts else "/"

    def run(self, *command: str, timeout: float = 60.0,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``command`` inside the chroot to completion, output captured (text)."""
        res = subprocess.run(self.argv(*command), stdin=subprocess.DEVNULL, capture_output=True,
                             text=True, timeout=timeout, env=chroot_env())
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} in {self.root} exited {res.returncode}:\n"
                               f"{res.stdout}{res.stderr}")
        return res

    def popen(self, *command: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``command`` inside the chroot; its pid is the command's (chroot execs it).
        Defaults: stdin from /dev/null, the chroot environment, its own session (a Ctrl-C on
        the test does not reach it: the caller stops it)."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("env", chroot_env())
        kwargs.setdefault("start_new_session", True)
        return subprocess.Popen(self.argv(*command), **kwargs)

    def workdir(self) -> Path:
        """A new empty directory ``ROOT/tmp/hf-<pid>-<random>`` (host path; mode 0755, so
        engines that drop privileges can read it). Left-overs of dead processes are removed."""
        tmp = self.root / "tmp"
        _prune_workdirs(tmp)
        path = Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{os.getpid()}-", dir=tmp))
        path.chmod(0o755)
        return path


def _prune_workdirs(tmp: Path) -> None:
    """Remove ``hf-<pid>-*`` directories whose process is gone (a killed test run)."""
    with contextlib.suppress(OSError):
        for entry in tmp.iterdir():
            if not entry.name.startswith(WORK_PREFIX) or not entry.is_dir():
                continue
            pid_text = entry.name[len(WORK_PREFIX):].split("-", 1)[0]
            if not pid_text.isdigit() or _alive(int(pid_text)):
                continue
            _remove_tree(entry)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------- marker


def _read_marker(root: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != MARKER_FORMAT:
        return None
    if not isinstance(data.get("packages"), dict):
        return None
    return data


def _write_marker(root: Path, data: dict[str, Any]) -> None:
    tmp = root / (MARKER + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, root / MARKER)


def _loaded(root: Path, packages: Iterable[str]) -> Trixie | None:
    """The chroot at ``root`` if its marker says it is complete and holds ``packages``."""
    data = _read_marker(root)
    if data is None or not set(packages) <= set(data["packages"]):
        return None
    return Trixie(root, dict(data["packages"]), data)


def _installed(root: Path, packages: Iterable[str]) -> dict[str, str]:
    """package -> version, read from the chroot's dpkg database (raises if one is missing)."""
    res = subprocess.run(
        [_chroot_exe(), str(root), "dpkg-query", "-W", "-f", "${Package}\t${Version}\t${Status}\n",
         *packages],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, env=chroot_env(),
    )
    found = {}
    for line in res.stdout.splitlines():
        name, version, status = [*line.split("\t"), "", ""][:3]
        if status.endswith(" installed"):
            found[name] = version
    missing = [p for p in packages if p not in found]
    if missing:
        raise Unavailable(f"packages not installed in {root}: {', '.join(missing)}"
                          f" ({res.stderr.strip()})")
    return {p: found[p] for p in packages}


# ----------------------------------------------------------------------------- mounts, trees


def _unescape_mount(text: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and text[i + 1:i + 4].isdigit():
            out.append(chr(int(text[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or under ``path``, deepest first."""
    found = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            if len(fields) > 4:
                point = _unescape_mount(fields[4])
                if point == str(path) or point.startswith(str(path) + "/"):
                    found.append(point)
    return sorted(found, key=len, reverse=True)


def _remove_tree(path: Path) -> None:
    """``rm -rf path``, never through a mount (unmounted first; refused if that fails)."""
    if not path.exists() and not path.is_symlink():
        return
    for point in _mounts_under(path):
        subprocess.run(["umount", "-l", point], stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=60)
    left = _mounts_under(path)
    if left:
        raise Unavailable(f"cannot remove {path}: still mounted: {', '.join(left)}")
    if path.is_symlink() or not path.is_dir():
        path.unlink()
    else:
        shutil.rmtree(path)


# ----------------------------------------------------------------------------- lock, build


@contextlib.contextmanager
def _locked(lock_path: Path, log: Log, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as f:
        deadline = time.monotonic() + timeout
        said = False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not said:
                    log(f"waiting for another process building the chroot ({lock_path})")
                    said = True
                if time.monotonic() >= deadline:
                    raise Unavailable(f"{lock_path} held by another process for {timeout:g} s"
                                      ) from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _probe_mirror(url: str) -> None:
    """Raise Unavailable unless ``url``/dists/trixie/InRelease answers (a HEAD)."""
    target = f"{url}/dists/{SUITE}/InRelease"
    request = urllib.request.Request(target, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=MIRROR_TIMEOUT) as resp:
            if resp.status != 200:
                raise Unavailable(f"Debian mirror {url} answered {resp.status} for {target}")
    except urllib.error.HTTPError as exc:
        raise Unavailable(f"Debian mirror {url} answered {exc.code} for {target}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise Unavailable(f"Debian mirror {url} unreachable ({reason})") from None


def _step(argv: list[str], logfile: Path, what: str, timeout: float,
          env: dict[str, str] | None = None) -> None:
    """Run one build step, its output appended to ``logfile``; Unavailable on failure."""
    with logfile.open("ab") as out:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        try:
            rc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, timeout=timeout, env=env).returncode
        except subprocess.TimeoutExpired:
            raise Unavailable(f"{what} took over {timeout:g} s; see {logfile}") from None
    if rc != 0:
        lines = [ln for ln in logfile.read_text(errors="replace").splitlines() if ln.strip()]
        last = lines[-1].strip() if lines else ""
        raise Unavailable(f"{what} failed (exit {rc}: {last[:200]}); see {logfile}")


def _apt_install(root: Path, packages: Iterable[str], logfile: Path) -> None:
    env = chroot_env()
    chroot_cmd = [_chroot_exe(), str(root)]
    # A build or an install cut short (killed) leaves dpkg half-done: finish it first.
    _step([*chroot_cmd, "dpkg", "--configure", "-a"], logfile, "dpkg --configure -a",
          APT_TIMEOUT, env)
    _step([*chroot_cmd, "apt-get", "update", "-q"], logfile, "apt-get update in the chroot",
          APT_TIMEOUT, env)
    _step([*chroot_cmd, "apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
          logfile, "apt-get install in the chroot", APT_TIMEOUT, env)
    _step([*chroot_cmd, "apt-get", "clean"], logfile, "apt-get clean", APT_TIMEOUT, env)


def _build(root: Path, packages: tuple[str, ...], url: str, log: Log) -> Trixie:
    """debootstrap + apt-get into ROOT.tmp, marker, rename to ROOT. Called under the lock."""
    debootstrap = shutil.which("debootstrap") or shutil.which(
        "debootstrap", path="/usr/sbin:/sbin")
    if debootstrap is None:
        raise Unavailable("debootstrap not installed (Debian package debootstrap)")
    scripts = Path("/usr/share/debootstrap/scripts")
    if scripts.is_dir() and not (scripts / SUITE).exists():
        raise Unavailable(f"this debootstrap knows no {SUITE!r} (no {scripts / SUITE}): "
                          "upgrade the Debian package debootstrap")
    _probe_mirror(url)
    tmp = root.with_name(root.name + ".tmp")
    logfile = root.with_name(root.name + ".build.log")
    _remove_tree(tmp)
    logfile.write_text(f"# {datetime.now(UTC).isoformat()} building {root}\n")
    t0 = time.monotonic()
    log(f"debootstrap --variant=minbase {SUITE} {tmp} {url} (about 35 s)")
    _step([debootstrap, "--variant=minbase", SUITE, str(tmp), url], logfile, "debootstrap",
          DEBOOTSTRAP_TIMEOUT)
    t_bootstrap = time.monotonic() - t0
    # No service may start in the chroot (postinst scripts ask invoke-rc.d).
    policy = tmp / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\n# haproxy-forwarder tests: never start services here\nexit 101\n")
    policy.chmod(0o755)
    log(f"apt-get install {' '.join(packages)}")
    _apt_install(tmp, packages, logfile)
    versions = _installed(tmp, packages)
    (tmp / "tmp").chmod(0o1777)
    data = {
        "format": MARKER_FORMAT,
        "suite": SUITE,
        "mirror": url,
        "variant": "minbase",
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "debootstrap_seconds": round(t_bootstrap, 1),
        "build_seconds": round(time.monotonic() - t0, 1),
        "packages": versions,
        "engines": {"haproxy": "/usr/sbin/haproxy", "rsyslogd": "/usr/sbin/rsyslogd"},
    }
    _write_marker(tmp, data)
    if root.exists() or root.is_symlink():  # an incomplete or foreign tree: replaced
        aside = root.with_name(f"{root.name}.old-{os.getpid()}")
        os.rename(root, aside)
        _remove_tree(aside)
    os.rename(tmp, root)
    log(f"built {root} in {data['build_seconds']} s: "
        + ", ".join(f"{p} {v}" for p, v in versions.items()))
    return Trixie(root, versions, data)


def _add_packages(found: dict[str, Any], root: Path, packages: tuple[str, ...],
                  url: str, log: Log) -> Trixie:
    """Install ``packages`` missing from an existing chroot, in place (additive: a running
    engine of another process is not disturbed), then update the marker."""
    missing = [p for p in packages if p not in found["packages"]]
    _probe_mirror(url)
    logfile = root.with_name(root.name + ".build.log")
    log(f"apt-get install {' '.join(missing)} in {root}")
    _apt_install(root, missing, logfile)
    versions = {**found["packages"], **_installed(root, missing)}
    data = {**found, "packages": versions,
            "updated_at": datetime.now(UTC).isoformat(timespec="seconds")}
    _write_marker(root, data)
    return Trixie(root, versions, data)


def _stderr_log(message: str) -> None:
    print(f"trixie chroot: {message}", file=sys.stderr, flush=True)


def ensure(packages: Iterable[str] = PACKAGES, *, build: bool | None = None,
           log: Log = _stderr_log) -> Trixie:
    """The chroot holding ``packages``, built (or completed) first if need be.

    Raises Unavailable with one line: not root, not Linux, debootstrap missing, the mirror
    unreachable, a failed step (with the path of the build log), or, with ``build=False``
    (default: $FORWARDER_TEST_TRIXIE_BUILD is not "0"), not built.
    """
    wanted = tuple(dict.fromkeys([*PACKAGES, *packages]))
    if build is None:
        build = os.environ.get(BUILD_ENV, "1") not in ("0", "no", "false")
    if not sys.platform.startswith("linux"):
        raise Unavailable(f"needs Linux (chroot), not {sys.platform}")
    if os.geteuid() != 0:
        raise Unavailable(f"needs root (chroot, debootstrap); running as uid {os.geteuid()}")
    _chroot_exe()
    root = location()
    found = _loaded(root, wanted)
    if found is not None:
        return found
    if not build:
        raise Unavailable(f"not built at {root} and {BUILD_ENV}=0 (run .ci/prepare-trixie)")
    url = mirror()
    with _locked(root.with_name(root.name + ".lock"), log):
        found = _loaded(root, wanted)  # built by another process while this one waited
        if found is not None:
            return found
        partial = _read_marker(root)
        if partial is not None:
            return _add_packages(partial, root, wanted, url, log)
        return _build(root, wanted, url, log)


@functools.cache
def _cached(packages: tuple[str, ...]) -> tuple[Trixie | None, str]:
    try:
        return ensure(packages), ""
    except Unavailable as exc:
        return None, str(exc)


def chroot(packages: Iterable[str] = PACKAGES) -> tuple[Trixie | None, str]:
    """``(Trixie, "")``, or ``(None, reason)`` in one line; tried once per process (a
    failure is not retried by every test)."""
    return _cached(tuple(dict.fromkeys([*PACKAGES, *packages])))


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.trixie",
        description="Build (once) the Debian 13 chroot of the tests and print its versions.")
    parser.add_argument("--no-build", action="store_true",
                        help="only report; exit 1 when it is not built")
    parser.add_argument("--rebuild", action="store_true",
                        help="build anew even if it exists (replaced atomically)")
    parser.add_argument("--package", action="append", default=[], metavar="NAME",
                        help="a Debian package to hold besides the default ones (repeatable)")
    args = parser.parse_args(argv)
    root = location()
    packages = tuple(dict.fromkeys([*PACKAGES, *args.package]))
    t0 = time.monotonic()
    try:
        if args.rebuild:
            if os.geteuid() != 0:
                raise Unavailable(f"needs root; running as uid {os.geteuid()}")
            with _locked(root.with_name(root.name + ".lock"), _stderr_log):
                trixie = _build(root, packages, mirror(), _stderr_log)
        else:
            trixie = ensure(packages, build=not args.no_build)
    except Unavailable as exc:
        print(f"trixie chroot {root}: unavailable: {exc}", file=sys.stderr)
        return 1
    took = time.monotonic() - t0
    print(f"trixie chroot {trixie.root} (built {trixie.marker.get('built_at', '?')}, "
          f"ready in {took:.1f} s): {trixie.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
