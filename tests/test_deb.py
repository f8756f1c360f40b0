"""The Debian package: `make deb` (dh-virtualenv, debian/) builds it once for the module, its
contents are read with dpkg-deb; with FORWARDER_TEST_DEB_INSTALL=1 (CI: root on a
throwaway machine) it is also installed, run as its user, removed and purged on this machine.

The build takes about 1.5 minutes here (a venv filled from the package index, the Cython core
compiled with gcc -O3); the install cycle about 10 seconds.
"""

from __future__ import annotations

import grp
import io
import os
import pwd
import re
import shutil
import stat
import subprocess
import tarfile
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import haproxy_forwarder
from devtools.daemon import Daemon
from devtools.traffic import octet_counted, rfc5424, send_tcp
from tests.fake_intake import VALID_KEY, FakeIntake

REPO = Path(__file__).resolve().parents[1]
NAME = "haproxy-forwarder"
VENV = f"/opt/venvs/{NAME}"
UNIT = f"/lib/systemd/system/{NAME}.service"
WANTS = Path(f"/etc/systemd/system/multi-user.target.wants/{NAME}.service")
ETC = Path(f"/etc/{NAME}")
SPOOL = Path(f"/var/lib/{NAME}")
INSTALL_ENV = "FORWARDER_TEST_DEB_INSTALL"
BUILD_TIMEOUT = 600
DEBIAN_PYTHON = "/usr/bin/python3"


def _cannot_build() -> str | None:
    for tool, package in (("dpkg-buildpackage", "dpkg-dev"), ("dh", "debhelper"),
                          ("dh_virtualenv", "dh-virtualenv")):
        if shutil.which(tool) is None:
            return f"{tool} not found: the package build needs Debian's {package}"
    if not Path(DEBIAN_PYTHON).exists():
        return f"{DEBIAN_PYTHON} not found: the package is built with Debian's python3"
    if os.geteuid() != 0:
        return "not root: the package tests run on the CI machine, as root (a ~1.5 min build)"
    return None


pytestmark = [
    pytest.mark.skipif(_cannot_build() is not None, reason=_cannot_build() or ""),
    pytest.mark.timeout(BUILD_TIMEOUT + 120),
]


def _debian_python_minor() -> str:
    code = "import sys; print('%d.%d' % sys.version_info[:2])"
    return subprocess.run([DEBIAN_PYTHON, "-c", code], check=True, capture_output=True,
                          text=True).stdout.strip()


@dataclass
class Deb:
    path: Path
    data: dict[str, tarfile.TarInfo]  # "./opt/..." -> member
    data_tar: tarfile.TarFile
    control: tarfile.TarFile

    def read(self, name: str) -> bytes:
        f = self.data_tar.extractfile(self.data[name])
        assert f is not None, name
        return f.read()

    def control_file(self, name: str) -> bytes:
        f = self.control.extractfile(f"./{name}")
        assert f is not None, name
        return f.read()

    def field(self, name: str) -> str:
        return subprocess.run(["dpkg-deb", "-f", str(self.path), name], check=True,
                              capture_output=True, text=True).stdout.strip()


def _tar_of(*cmd: str) -> tarfile.TarFile:
    raw = subprocess.run(cmd, check=True, capture_output=True).stdout
    return tarfile.open(fileobj=io.BytesIO(raw), mode="r:")


def _build_env() -> dict[str, str]:
    # Nothing of ours or of an enclosing `make` (make test runs pytest) steers the build.
    drop = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")
    return {k: v for k, v in os.environ.items()
            if not k.startswith("HAPROXY_FORWARDER_") and k not in drop}


def _tree_debian() -> set[str]:
    return {str(p.relative_to(REPO)) for p in (REPO / "debian").rglob("*")}


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deb]:
    tmp = tmp_path_factory.mktemp("deb")
    before = _tree_debian()
    r = subprocess.run(
        ["make", "-C", str(REPO), "--no-print-directory", "deb",
         f"DEB_BUILD={tmp / 'build'}", f"DEB_DIST={tmp / 'dist'}"],
        capture_output=True, text=True, env=_build_env(), timeout=BUILD_TIMEOUT,
    )
    assert r.returncode == 0, f"make deb failed:\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}"
    # The build ran on a copy: nothing appeared in the tree's debian/ (debhelper's work dirs).
    assert _tree_debian() == before
    path = Path(r.stdout.strip().splitlines()[-1])
    data_tar = _tar_of("dpkg-deb", "--fsys-tarfile", str(path))
    control = _tar_of("dpkg-deb", "--ctrl-tarfile", str(path))
    yield Deb(path, {m.name: m for m in data_tar.getmembers()}, data_tar, control)
    data_tar.close()
    control.close()


def test_make_deb_names_the_package_by_project_version_and_arch(deb: Deb) -> None:
    arch = subprocess.run(["dpkg", "--print-architecture"], check=True, capture_output=True,
                          text=True).stdout.strip()
    version = haproxy_forwarder.__version__
    assert deb.path.is_file() and deb.path.parent.name == "dist"  # DEB_DIST
    assert deb.path.name == f"{NAME}_{version}_{arch}.deb"
    assert (deb.field("Package"), deb.field("Version"), deb.field("Architecture")) == (
        NAME, version, arch)
    depends = [d.strip() for d in deb.field("Depends").split(",")]
    minor = _debian_python_minor()
    major, n = minor.split(".")
    # The venv links to this interpreter and its compiled modules are built for its ABI.
    next_minor = f"{major}.{int(n) + 1}"
    for needed in (f"python{minor}", f"python3 (>= {minor}~)", f"python3 (<< {next_minor}~)",
                   "adduser"):
        assert needed in depends, (needed, depends)
    assert any(d.startswith("libc6") for d in depends), depends  # ${shlibs:Depends} was filled


def test_venv_is_self_contained_with_the_compiled_core(deb: Deb) -> None:
    minor = _debian_python_minor()
    site = f".{VENV}/lib/python{minor}/site-packages"
    interp = deb.data[f".{VENV}/bin/python{minor}"]
    assert interp.issym() and interp.linkname == f"/usr/bin/python{minor}"
    assert b"home = /usr/bin\n" in deb.read(f".{VENV}/pyvenv.cfg")
    script = deb.data[f".{VENV}/bin/{NAME}"]
    assert script.isfile() and script.mode & 0o111
    assert deb.read(script.name).startswith(f"#!{VENV}/bin/python\n".encode())
    link = deb.data[f"./usr/bin/{NAME}"]
    assert link.issym()
    assert os.path.normpath(os.path.join("/usr/bin", link.linkname)) == f"{VENV}/bin/{NAME}"
    # Every Cython module of the tree is in the package as a compiled extension.
    for pyx in sorted((REPO / "haproxy_forwarder").rglob("*.pyx")):
        rel = pyx.relative_to(REPO).with_suffix("")
        pattern = re.compile(re.escape(f"{site}/{rel}") + r"\.cpython-\d+-[^/]*\.so$")
        assert any(pattern.match(n) for n in deb.data), f"{rel}: no compiled extension"
    assert any(re.search(r"/ingest/_native\.cpython-.*\.so$", n) for n in deb.data)
    for dep in ("uvloop", "httpx", "pydantic", "orjson", "structlog"):
        assert f"{site}/{dep}" in deb.data, dep
    # Bytecode checked by source hash (flags: hash-based, check source): dpkg-deb's clamped
    # file times cannot make it stale.
    pyc = [n for n in deb.data if n.startswith(f"{site}/haproxy_forwarder/__pycache__/cli.")]
    assert len(pyc) == 1, pyc
    assert int.from_bytes(deb.read(pyc[0])[4:8], "little") == 0b11


def test_unit_drop_in_and_conffile(deb: Deb) -> None:
    unit = deb.read(f".{UNIT}")
    assert unit == (REPO / "systemd" / f"{NAME}.service").read_bytes()  # the tree's, as built
    # Every program the unit runs is one the package ships.
    for line in unit.decode().splitlines():
        if re.match(r"Exec(Start|StartPre)=\S", line):
            program = line.split("=", 1)[1].split()[0].lstrip("-@:+!")
            assert f".{program}" in deb.data, line
    drop_in = deb.read(f".{UNIT}.d/expect-compiled.conf").decode()
    assert "Environment=HAPROXY_FORWARDER_EXPECT_COMPILED=1" in drop_in.splitlines()
    assert deb.control_file("conffiles").decode().split() == [f"{ETC}/config.toml"]
    shipped = tomllib.loads(deb.read(f".{ETC}/config.toml").decode())
    example = tomllib.loads((REPO / "config" / f"{NAME}.toml").read_text())
    assert shipped["spool"]["dir"] == str(SPOOL)
    example["spool"]["dir"] = str(SPOOL)
    assert shipped == example
    # The key file is made by postinst (0600 root), never shipped; the spool neither.
    assert not [n for n in deb.data if n.startswith((f".{ETC}/env", f".{SPOOL}"))]


def test_maintainer_scripts(deb: Deb, tmp_path: Path) -> None:
    for name in ("postinst", "prerm", "postrm"):
        member = deb.control.getmember(f"./{name}")
        assert member.mode & 0o777 == 0o755, name
        text = deb.control_file(name)
        assert text.startswith(b"#!/bin/sh\n"), name
        script = tmp_path / name
        script.write_bytes(text)
        r = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, (name, r.stderr)


# -- on this machine: dpkg -i, -r, -P ------------------------------------------------------------


def _dpkg(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**_build_env(), "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(["dpkg", *args], capture_output=True, text=True, env=env, timeout=120)


def _status() -> str:
    r = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Status}", NAME],
                       capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else "not-installed"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([f"/usr/bin/{NAME}", *args], capture_output=True, text=True,
                          env=_build_env(), timeout=60)


class PackagedDaemon(Daemon):
    """The installed command on the installed config, as the package's user (as the unit)."""

    def command(self) -> list[str]:
        return [f"/usr/bin/{NAME}", "--config", f"{ETC}/config.toml", "run"]


def _run_installed_daemon(intake: FakeIntake, tmp: Path) -> None:
    # The daemon user must read the CA: beside its spool, removed with it on purge.
    ca = SPOOL / "test-ca.pem"
    shutil.copy(intake.ca_file, ca)
    ca.chmod(0o644)
    env = {
        "HAPROXY_FORWARDER_INTAKE__URL": intake.url,
        "HAPROXY_FORWARDER_INTAKE__KEY": VALID_KEY,
        "HAPROXY_FORWARDER_INTAKE__CA_FILE": str(ca),
        "HAPROXY_FORWARDER_LISTEN__TCP": '["127.0.0.1:0"]',
        "HAPROXY_FORWARDER_LISTEN__UDP": "[]",
        "HAPROXY_FORWARDER_STATUS__LISTEN": "",
        "HAPROXY_FORWARDER_LOG__FORMAT": "json",
        "HAPROXY_FORWARDER_BATCH__MAX_DELAY": "0.2",
        "HAPROXY_FORWARDER_EXPECT_COMPILED": "1",  # as the package's drop-in sets it
    }
    def as_daemon_user(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(*args, user=NAME, group=NAME, extra_groups=[], **kwargs)

    with PackagedDaemon(tmp, {}, env=env, isolate_env=True, spawn=as_daemon_user) as d:
        line = ("10.0.0.1:51234 [26/Nov/2025:10:00:00.123] www app/app1 0/0/1/2/3 200 512 "
                '- - ---- 1/1/0/0/0 0/0 "GET /deb HTTP/1.1"')
        send_tcp(d.tcp_port, octet_counted([rfc5424("haproxy", line)]))
        assert intake.wait_for(1, timeout=30), d.stderr_text()
        assert intake.event_texts() == [line]
        assert d.stop() == 0
    # It ran with the spool the package made for it.
    assert (SPOOL / "segments").is_dir()
    assert (SPOOL / "segments").stat().st_uid == pwd.getpwnam(NAME).pw_uid


@pytest.mark.skipif(os.environ.get(INSTALL_ENV) != "1",
                    reason=f"installs the package on this machine: only with {INSTALL_ENV}=1 "
                           "(CI, a throwaway machine)")
def test_install_run_remove_purge(deb: Deb, intake: FakeIntake, tmp_path: Path) -> None:
    if _status() != "not-installed":
        pytest.skip(f"{NAME} is already installed here ({_status()}): not replacing it")
    for path in (ETC, SPOOL):
        if path.exists():
            pytest.skip(f"{path} exists: purging the package would delete it")
    had_user = _user_exists()
    try:
        _check_install(deb)
        _run_installed_daemon(intake, tmp_path)
        _check_reinstall_keeps_admin_files(deb)
        _check_remove()
        _check_purge()
        _check_preseeded_key_install(deb)
    finally:
        if _status() != "not-installed":
            _dpkg("--purge", NAME)
        if not had_user and _user_exists():
            subprocess.run(["deluser", "--system", "--quiet", NAME], check=False)
            subprocess.run(["delgroup", "--system", "--quiet", NAME], check=False)


def _user_exists() -> bool:
    try:
        pwd.getpwnam(NAME)
    except KeyError:
        return False
    return True


def _check_install(deb: Deb) -> None:
    r = _dpkg("--install", str(deb.path))
    assert r.returncode == 0, r.stdout + r.stderr
    # No key yet: enabled, not started, and said so.
    assert "enabled, not started: no intake key yet" in r.stderr
    user = pwd.getpwnam(NAME)
    assert user.pw_uid < 1000 and user.pw_shell == "/usr/sbin/nologin"
    assert user.pw_dir == str(SPOOL)
    assert grp.getgrgid(user.pw_gid).gr_name == NAME
    st = SPOOL.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (user.pw_uid, user.pw_gid, 0o700)
    env = ETC / "env"
    st = env.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600)
    # Only comments: nothing set, so nothing the daemon's strict variable check could refuse.
    assert all(not ln.strip() or ln.startswith("#") for ln in env.read_text().splitlines())
    assert (ETC / "config.toml").is_file()
    conffiles = subprocess.run(["dpkg-query", "-W", "-f=${Conffiles}", NAME], check=True,
                               capture_output=True, text=True).stdout
    assert f"{ETC}/config.toml " in conffiles
    assert Path(UNIT).is_file()
    # Enabled: the symlink deb-systemd-helper makes, which systemd reads at boot (no systemd
    # runs here, so `systemctl is-enabled` and starting it cannot be checked).
    assert WANTS.is_symlink() and WANTS.resolve() == Path(UNIT).resolve()
    if shutil.which("systemd-analyze"):
        r = subprocess.run(["systemd-analyze", "verify", UNIT], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    r = _cli("--version")
    assert r.returncode == 0 and "ingest: native" in r.stdout, r.stdout + r.stderr
    r = _cli("--config", f"{ETC}/config.toml", "check-config")
    assert r.returncode == 0, r.stderr


def _check_reinstall_keeps_admin_files(deb: Deb) -> None:
    env, conf = ETC / "env", ETC / "config.toml"
    env.write_text(f"HAPROXY_FORWARDER_INTAKE__KEY={VALID_KEY}\n")
    with conf.open("a") as f:
        f.write("# edited by the admin\n")
    before = (env.read_bytes(), conf.read_bytes())
    r = _dpkg("--install", str(deb.path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert (env.read_bytes(), conf.read_bytes()) == before
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    assert "not started" not in r.stderr


def _check_remove() -> None:
    keep = SPOOL / "undelivered-test-file"
    keep.write_text("spooled\n")
    r = _dpkg("--remove", NAME)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _status() == "config-files"
    assert not Path(f"/usr/bin/{NAME}").exists() and not Path(VENV).exists()
    assert keep.read_text() == "spooled\n"
    assert (ETC / "config.toml").is_file() and (ETC / "env").is_file()


def _check_purge() -> None:
    r = _dpkg("--purge", NAME)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _status() == "not-installed"
    assert not SPOOL.exists() and not ETC.exists()
    assert not WANTS.is_symlink()
    # Kept on purge, on purpose (Debian practice; README says so).
    assert _user_exists()


def _check_preseeded_key_install(deb: Deb) -> None:
    # Configuration management drops the key first, then installs: the file is used as it is,
    # and the key counts as configured (with systemd running, postinst would start the unit).
    ETC.mkdir(mode=0o755)
    env = ETC / "env"
    env.write_text(f"HAPROXY_FORWARDER_INTAKE__KEY={VALID_KEY}\n")
    env.chmod(0o600)
    before = env.read_bytes()
    r = _dpkg("--install", str(deb.path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "not started" not in r.stderr
    assert env.read_bytes() == before
