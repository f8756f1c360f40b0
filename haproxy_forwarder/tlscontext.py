"""The server side of TLS ([tls]): the SSLContext, the client-name rule, the handshake limits.

Shared by every listener that speaks TLS (listen.tls, RELP with relp.tls), so one process
has one certificate, one cap on handshakes in progress and one place a SIGHUP swaps them:
`ServerTls.install` replaces the context for new connections, while open ones keep the
SSLObject (and so the certificate) they were made with.

`tls_problem` is what config validation calls: every file is loaded exactly as the listener
will load it, so a broken certificate is one config line (exit 2, or `reload_failed`), never
a failed start or a traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import re
import ssl
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, Protocol, TypeVar

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TlsFileError(ValueError):
    """One line naming the setting and the file: what is wrong with it."""


class TlsConfig(Protocol):
    """The [tls] settings, as this module reads them (config.TlsConfig is one): a protocol,
    so that the config can validate its files here without this module importing it."""

    @property
    def cert_file(self) -> Path | None: ...
    @property
    def key_file(self) -> Path | None: ...
    @property
    def min_version(self) -> Literal["1.2", "1.3"]: ...
    @property
    def client_ca_file(self) -> Path | None: ...
    @property
    def allowed_names(self) -> list[str]: ...
    @property
    def handshake_timeout(self) -> float: ...
    @property
    def max_handshakes(self) -> int: ...


def _no_passphrase() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    return b""


def _read(setting: str, path: Path, marker: bytes) -> bytes:
    """Readable, and PEM of the kind expected (checked by hand: OpenSSL's own error does not
    say which of the two files of load_cert_chain it could not read)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TlsFileError(f"{setting}: {str(path)!r}: {exc.strerror}") from None
    if b"-----BEGIN " not in data or marker not in data:
        kind = "certificate" if marker == b"CERTIFICATE-----" else "private key"
        raise TlsFileError(f"{setting}: {str(path)!r} holds no PEM {kind}")
    return data


def build_context(cfg: TlsConfig) -> ssl.SSLContext:
    """The server context of `cfg`; TlsFileError (one line) if a file cannot be used."""
    if cfg.cert_file is None or cfg.key_file is None:
        missing = "tls.cert_file" if cfg.cert_file is None else "tls.key_file"
        raise TlsFileError(f"{missing}: missing (a TLS listener needs tls.cert_file and "
                           "tls.key_file, PEM)")
    _read("tls.cert_file", cfg.cert_file, b"CERTIFICATE-----")
    if b"ENCRYPTED" in _read("tls.key_file", cfg.key_file, b"PRIVATE KEY-----"):
        raise TlsFileError(f"tls.key_file: {str(cfg.key_file)!r} is encrypted; the daemon "
                           "needs it without a passphrase (readable by its user only)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = VERSIONS[cfg.min_version]
    # A client-initiated renegotiation is a handshake outside every limit below.
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    # Syslog senders keep one long connection: tickets would be work for nothing.
    ctx.num_tickets = 0
    try:
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file, password=_no_passphrase)
    except ssl.SSLError as exc:
        reason = getattr(exc, "reason", "") or ""
        if "MISMATCH" in reason:
            raise TlsFileError(f"tls.key_file: {str(cfg.key_file)!r} is not the key of "
                               f"tls.cert_file {str(cfg.cert_file)!r}") from None
        raise TlsFileError(f"tls.cert_file / tls.key_file: {str(cfg.cert_file)!r}, "
                           f"{str(cfg.key_file)!r} cannot be used (OpenSSL: "
                           f"{reason or exc.strerror or 'unreadable PEM'})") from None
    except OSError as exc:
        raise TlsFileError(f"tls.cert_file: {exc.strerror or exc}") from None
    if cfg.client_ca_file is not None:
        _read("tls.client_ca_file", cfg.client_ca_file, b"CERTIFICATE-----")
        try:
            ctx.load_verify_locations(cafile=str(cfg.client_ca_file))
        except (ssl.SSLError, OSError):
            raise TlsFileError(f"tls.client_ca_file: {str(cfg.client_ca_file)!r} holds no "
                               "usable PEM certificate") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def tls_problem(cfg: TlsConfig, needed: bool) -> str | None:
    """The one line that makes [tls] unusable, or None. Files are loaded only when set or
    `needed` (some listener does TLS): a config without TLS pays nothing."""
    if cfg.allowed_names and cfg.client_ca_file is None:
        return ("tls.allowed_names: needs tls.client_ca_file (names are those of client "
                "certificates signed by that CA)")
    for pattern in cfg.allowed_names:
        if not _ascii_name(pattern):
            # Not converted with Python's idna codec: it is IDNA 2003 (nameprep folds
            # compatibility characters, ß becomes ss), so the A-label it made could differ
            # from the one in the certificate. The operator copies the name it holds.
            return (f"tls.allowed_names: {pattern!r} is not an ASCII name: certificates "
                    "carry internationalized names as IDNA A-labels (xn--...), and names are "
                    "compared as ASCII, as rsyslog does: write the A-label")
    if not needed and cfg.cert_file is None and cfg.key_file is None:
        return None
    try:
        build_context(cfg)
    except TlsFileError as exc:
        return str(exc)
    return None


def peer_names(cert: dict[str, Any]) -> list[str]:
    """Subject CN and DNS subjectAltNames of a verified peer certificate (getpeercert())."""
    names = [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
    names += [v for k, v in cert.get("subjectAltName", ()) if k == "DNS"]
    return list(dict.fromkeys(names))  # the CN is often a SAN too


def _ascii_name(name: str) -> bool:
    """Printable ASCII only (IDNA A-labels are): no control byte, no NUL, nothing that
    str.lower() or a Unicode-aware match could fold onto an ASCII letter (U+212A KELVIN SIGN
    lowers to "k")."""
    return name.isascii() and name.isprintable() and bool(name)


@functools.lru_cache(maxsize=256)
def _name_pattern(pattern: str) -> re.Pattern[str]:
    """`*` is any run of characters within one DNS label, `?` one character; the rest is
    literal. A `*` that crossed dots (fnmatch's) would let `*.example.org` admit
    `evil.other.example.org`: wildcards in certificates (RFC 6125) and rsyslog's
    PermittedPeer stay within a label too."""
    parts = []
    for c in pattern.lower():
        parts.append("[^.]*" if c == "*" else "[^.]" if c == "?" else re.escape(c))
    return re.compile("".join(parts))


def name_allowed(names: Iterable[str], patterns: list[str]) -> bool:
    """Any of the peer's names (CN and DNS SANs, as rsyslog's x509/name checks both) matches
    one of the patterns, case-insensitive as DNS names are (A-Z only); no pattern: any name.

    Names are compared as ASCII, as rsyslog compares them: a name holding anything else
    (a CN "\u212aafka.example.org", which Unicode lowercasing turns into "kafka...") matches
    no pattern. Patterns are ASCII (tls_problem refuses the rest); one that is not matches
    nothing, should it come from elsewhere."""
    if not patterns:
        return True
    compiled = [_name_pattern(p) for p in patterns if _ascii_name(p)]
    # On ASCII text str.lower() maps A-Z only.
    ascii_names = [n.lower() for n in names if _ascii_name(n)]
    return any(rx.fullmatch(n) for n in ascii_names for rx in compiled)


def _fingerprint(cfg: TlsConfig) -> str:
    """What the files hold now (a reload with the same paths may bring a new certificate)."""
    h = hashlib.sha256()
    for path in (cfg.cert_file, cfg.key_file, cfg.client_ca_file):
        h.update(path.read_bytes() if path is not None and path.is_file() else b"-")
    return h.hexdigest()[:16]


H = TypeVar("H", bound=Hashable)


class HandshakeSlots(Generic[H]):
    """Who holds the slots of tls.max_handshakes, over every TLS listener of the process:
    per peer address, oldest first.

    When they are all taken, a new connection does not wait behind silent sockets (as TCP's
    eviction at listen.max_connections, the oldest goes): `victim` names the handshake to
    close for it. An honest handshake takes a few round trips, so the oldest one still
    holding a slot is the most stalled; it is taken from the address holding the most, so
    one address (or a few) cannot keep every slot: a flood displaces its own handshakes, and
    the one handshake of an honest sender is the last to go. Pure; no clock (the order of
    arrival is the age).
    """

    def __init__(self) -> None:
        self._order = itertools.count()
        # address -> {handshake: arrival number}, in arrival order.
        self.by_address: dict[str, dict[H, int]] = {}
        self.count = 0

    def add(self, h: H, address: str) -> None:
        self.by_address.setdefault(address, {})[h] = next(self._order)
        self.count += 1

    def remove(self, h: H, address: str) -> bool:
        held = self.by_address.get(address)
        if held is None or held.pop(h, None) is None:
            return False
        if not held:
            del self.by_address[address]
        self.count -= 1
        return True

    def victim(self, address: str) -> H | None:
        """The handshake to close so that a new one of `address` can start: the oldest of the
        address that would hold the most (the newcomer counted in its own address's share;
        a tie goes to the one whose oldest came first). None if none is held.

        O(addresses holding a slot), run only when every slot is taken."""
        best: H | None = None
        best_key = (0, 0)
        for addr, held in self.by_address.items():
            h, arrival = next(iter(held.items()))
            key = (-(len(held) + (addr == address)), arrival)
            if best is None or key < best_key:
                best, best_key = h, key
        return best


@dataclass(eq=False)
class ServerTls:
    """The TLS settings in force, one per daemon; swapped whole on SIGHUP."""

    context: ssl.SSLContext | None = None
    allowed_names: list[str] = field(default_factory=list)
    handshake_timeout: float = 10.0
    max_handshakes: int = 256
    fingerprint: str = ""
    # Handshakes under way over every TLS listener: the cap is per process (it bounds CPU).
    # Shared by copy() (a refused reload puts the settings back, not the handshakes).
    slots: HandshakeSlots[Any] = field(default_factory=HandshakeSlots)

    @property
    def handshaking(self) -> int:
        return self.slots.count

    def install(self, context: ssl.SSLContext, cfg: TlsConfig) -> bool:
        """New connections from now on get `context`; True if the files changed."""
        fingerprint = _fingerprint(cfg)
        changed = fingerprint != self.fingerprint
        self.context = context
        self.allowed_names = list(cfg.allowed_names)
        self.handshake_timeout = cfg.handshake_timeout
        self.max_handshakes = cfg.max_handshakes
        self.fingerprint = fingerprint
        return changed

    def load(self, cfg: TlsConfig) -> bool:
        return self.install(build_context(cfg), cfg)

    def copy(self) -> ServerTls:
        return dataclasses.replace(self)

    def restore(self, old: ServerTls) -> None:
        """Back to `old`'s settings (a refused reload); the handshakes under way are ours."""
        self.context, self.allowed_names = old.context, old.allowed_names
        self.handshake_timeout, self.max_handshakes = old.handshake_timeout, old.max_handshakes
        self.fingerprint = old.fingerprint
