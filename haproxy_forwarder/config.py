"""Configuration: a TOML file overridden by HAPROXY_FORWARDER_<SECTION>__<KEY> variables.

Loading never raises past `load()`: every problem becomes one readable line in ConfigError.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
import stat
import tomllib
import urllib.parse
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from .observability.logs import MASK
from .routing import Route, check_routes
from .tlscontext import tls_problem

DEFAULT_CONFIG_PATH = "/etc/haproxy-forwarder/config.toml"
CONFIG_ENV = "HAPROXY_FORWARDER_CONFIG"
ENV_PREFIX = "HAPROXY_FORWARDER_"

KIB = 1024
MIB = 1024 * KIB

# Base URLs from Sekoia's region documentation; the endpoint path is appended to them.
REGIONS: dict[str, str] = {
    "fra1": "https://intake.sekoia.io",
    "fra2": "https://intake.fra2.sekoia.io/api/v1/intake-http",
    "mco1": "https://intake.mco1.sekoia.io/api/v1/intake-http",
    "uae1": "https://intake.uae1.sekoia.io/api/v1/intake-http",
    "usa1": "https://intake.usa1.sekoia.io/api/v1/intake-http",
    # As Sekoia's regions page lists it: without the /api/v1/intake-http the others have.
    "sgp1": "https://intake.sgp1.sekoia.io",
}
DEFAULT_URL = REGIONS["fra1"]

# The intake rejects a single event over 250 KiB; it is dead-lettered instead of sent.
MAX_EVENT_BYTES = 250 * KIB
# Sekoia's clients stay under 10 MiB per request; we keep every encoded body under this.
MAX_REQUEST_BYTES = 9 * MIB
# Upper bound of the byte sizes (spool): past it a value is a typo, and JSON cannot hold it.
MAX_SIZE_LIMIT = 1 << 50


class ConfigError(Exception):
    """Invalid configuration; `problems` holds one human-readable line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _Section(BaseModel):
    # A misspelt key must be an error, not a silently ignored default.
    model_config = ConfigDict(extra="forbid")


def _valid_host(host: str) -> bool:
    """An IP address (IPv6 in brackets, or bare) or a host name: what bind() can be given.
    Caught here, "[::1" or "999.1.1.1" would only fail at start, as a resolver error."""
    if host.startswith("[") or host.endswith("]"):
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else ""
        kind: type[ipaddress.IPv4Address | ipaddress.IPv6Address] = ipaddress.IPv6Address
    elif ":" in host:
        kind = ipaddress.IPv6Address
    elif host.replace(".", "").isdigit():
        kind = ipaddress.IPv4Address
    else:
        return re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", host) is not None
    try:
        kind(host)
    except ValueError:
        return False
    return True


def _check_hostport(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if (not sep or not host or not (port.isascii() and port.isdigit())
            or not 0 <= int(port) <= 65535 or not _valid_host(host)):
        raise ValueError(f"{value!r} is not host:port (e.g. \"0.0.0.0:1514\")")
    return value


def _url_problem(value: str) -> str:
    """What makes an http(s) URL unusable (no host, a bad port, spaces), or ""."""
    if any(c.isspace() for c in value):
        return "contains a space"
    try:
        parts = urllib.parse.urlsplit(value)
        port = parts.port
    except ValueError as exc:
        if "port" in str(exc).lower():
            return "the port must be a number from 1 to 65535"
        return "the host cannot be read (an IPv6 address goes in brackets)"
    if not parts.hostname:
        return "has no host name"
    if port == 0:
        return "port 0 (ports are 1-65535)"
    return ""


class ListenConfig(_Section):
    tcp: list[str] = Field(default_factory=lambda: ["0.0.0.0:1514"])
    udp: list[str] = Field(default_factory=lambda: ["0.0.0.0:1514"])
    # Syslog over TLS (RFC 5425; octet counting, LF framing also read as on TCP): [tls].
    tls: list[str] = Field(default_factory=list)
    # RELP (rsyslog's omrelp): each message acknowledged once durable; [relp].
    relp: list[str] = Field(default_factory=list)
    max_message_size: int = Field(default=256 * KIB, ge=1024, le=64 * MIB)
    # Bounded so a connection flood cannot exhaust memory or file descriptors (Vector #8238).
    max_connections: int = Field(default=1024, ge=1, le=1 << 20)
    # One peer address may hold this many of them: a single host cannot take every slot,
    # while 64 is far above what a sender needs (rsyslog and HAProxy open one per target).
    max_connections_per_address: int = Field(default=64, ge=1)
    # A connection that completed no frame for this long is closed (trickled bytes do not
    # count); at max_connections the one with the oldest complete frame makes room.
    idle_timeout: float = Field(default=300.0, gt=0)
    # The old name of idle_timeout (it then only applied at the limit): read as idle_timeout.
    evict_idle_after: float | None = Field(default=None, gt=0)
    # Bytes held in unfinished frames over all TCP connections; past it the connections
    # holding the most are closed, so slow senders cannot pin max_connections x frame size.
    max_buffered_bytes: int = Field(default=32 * MIB, ge=64 * KIB)
    # CIDR blocks peers may come from (TCP at accept, UDP per datagram); empty: everyone.
    allow: list[str] = Field(default_factory=list)
    # SO_RCVBUF of each UDP socket, set at bind: what absorbs a burst while the loop is busy.
    # Linux doubles it (bookkeeping) and caps it at net.core.rmem_max; the result is logged.
    udp_rcvbuf: int = Field(default=8 * MIB, ge=1024, le=1 << 30)
    # CIDR blocks of the L4 balancers in front (HAProxy `mode tcp` with send-proxy[-v2]...):
    # a TCP, TLS or RELP connection from them must start with a PROXY protocol header (v1 or
    # v2), whose source address then stands for the sender everywhere (allow-list, caps,
    # routes, logs); a header from any other address is refused. Empty: no PROXY protocol.
    proxy_protocol: list[str] = Field(default_factory=list)

    @field_validator("tcp", "udp", "tls", "relp")
    @classmethod
    def _addresses(cls, values: list[str]) -> list[str]:
        return [_check_hostport(v) for v in values]

    @field_validator("allow", "proxy_protocol")
    @classmethod
    def _cidrs(cls, values: list[str]) -> list[str]:
        for v in values:
            try:
                ipaddress.ip_network(v, strict=False)
            except ValueError:
                raise ValueError(f"{v!r} is not an address or CIDR block") from None
        return values

    @model_validator(mode="after")
    def _old_name(self) -> ListenConfig:
        if self.evict_idle_after is not None and "idle_timeout" not in self.model_fields_set:
            self.idle_timeout = self.evict_idle_after
        return self


class TlsConfig(_Section):
    """The server side of listen.tls (and of RELP with relp.tls): certificate, client checks."""

    # PEM certificate chain and its private key; read at start and on SIGHUP.
    cert_file: Path | None = None
    key_file: Path | None = None
    min_version: Literal["1.2", "1.3"] = "1.2"
    # Set: peers must present a certificate signed by this CA (mutual TLS).
    client_ca_file: Path | None = None
    # With client_ca_file: the subject CN or a DNS SAN must match one of these patterns
    # ("*.example.org": a * stays within one label); empty: any certificate of that CA.
    allowed_names: list[str] = Field(default_factory=list)
    # A peer that has not finished its handshake by then is closed (a plain-TCP client on the
    # TLS port, a stalled attacker); handshakes in progress at once are capped.
    handshake_timeout: float = Field(default=10.0, gt=0, le=300)
    max_handshakes: int = Field(default=256, ge=1)


class RelpConfig(_Section):
    # RELP over TLS (omrelp tls="on"), with the [tls] settings.
    tls: bool = False
    # Most unacknowledged messages one session may have; past it the session is not read
    # until answers go out, and the open batch is closed at once (its sender can send no
    # more), so answers cost one fsync. librelp negotiates no window: omrelp's windowSize
    # (librelp's default: 128, as here) must be at least this, or its answers wait for
    # batch.idle_flush (measured: 25,000 msg/s per session at 128/128, 1,200 at 64/128).
    max_window: int = Field(default=128, ge=1, le=65536)


class FilterConfig(_Section):
    programs: list[str] = Field(default_factory=lambda: ["haproxy", "hapee"])
    # Programs (prefixes) whose events keep "name[pid]: " before the message: HAProxy
    # Enterprise's parser on the Sekoia side expects it, the community one does not.
    keep_tag: list[str] = Field(default_factory=lambda: ["hapee"])

    @field_validator("programs")
    @classmethod
    def _non_empty(cls, values: list[str]) -> list[str]:
        if not values or any(not v for v in values):
            raise ValueError("needs at least one non-empty program name prefix")
        return values


class BatchConfig(_Section):
    # 10,000 (was 5,000): the most Sekoia's own clients put in one request. Half the requests
    # per event: 12-14 % less CPU per message through a 2M burst (bench.cpu, BENCHMARKS.md),
    # for ~12 MiB more peak memory (each batch in flight holds twice the events).
    max_events: int = Field(default=10_000, ge=1, le=100_000)
    max_bytes: int = Field(default=4 * MIB, ge=1024, le=8 * MIB)
    max_delay: float = Field(default=1.0, gt=0, le=60)
    # The open batch also closes when no event came for this long (the end of a burst goes out
    # at once, as syslog-ng flushes an idle queue); at or above max_delay it changes nothing.
    idle_flush: float = Field(default=0.05, gt=0, le=60)
    # Batches waiting for delivery in memory; at this many the listeners stop reading. 2 (was
    # 8, then 4): each waiting batch is ~3 MiB held (10,000 events), and with
    # `intake.concurrency` requests in flight beside them the workers never starve (measured in
    # BENCHMARKS.md); it also halves what a crash in overflow mode can lose.
    max_in_flight: int = Field(default=2, ge=1, le=1024)


Endpoint = Literal["array", "batch", "jsons", "plain-batch"]
ENDPOINT_PATHS: dict[str, str] = {
    "array": "/array",
    "batch": "/batch",
    "jsons": "/jsons",
    "plain-batch": "/plain/batch",
}


def read_key_file(path: Path) -> str:
    """The intake key held in `path`, which only its owner may read. Errors name the file and
    the rule, never its content."""
    try:
        st = path.stat()
    except OSError as exc:
        raise ValueError(f"key_file {str(path)!r}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"key_file {str(path)!r} is not a regular file")
    if st.st_mode & 0o077:
        raise ValueError(
            f"key_file {str(path)!r} has mode {stat.S_IMODE(st.st_mode):04o}: group or others "
            f"may read or write it; `chmod 600 {path}` (owned by the daemon's user)")
    try:
        text = path.read_text("utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ValueError(f"key_file {str(path)!r}: {reason}") from None
    if not text:
        raise ValueError(f"key_file {str(path)!r} is empty")
    if not text.isalnum():
        raise ValueError(f"key_file {str(path)!r}: the intake key must be alphanumeric "
                         "(as shown in Sekoia.io), on one line")
    return text


class IntakeConfig(_Section):
    url: str = DEFAULT_URL
    region: Literal["fra1", "fra2", "mco1", "uae1", "usa1", "sgp1"] | None = None
    key: SecretStr | None = None
    # The key in a file of its own (mode 0600), read at start and at each SIGHUP: keeps the
    # secret out of the config file, the environment of the process and `systemctl show`.
    key_file: Path | None = None
    endpoint: Endpoint = "array"
    gzip: bool = True
    ca_file: Path | None = None
    # Accept any certificate from the intake (no chain, no name check). Only for a test set-up;
    # a private CA (ca_file) is the way for TLS-inspecting proxies. Warned about at each start.
    insecure_skip_verify: bool = False
    proxy: str | None = None
    timeout: float = Field(default=30.0, gt=0, le=600)
    concurrency: int = Field(default=4, ge=1, le=64)
    # Backoff cap for transient failures (network, 408, 429, 5xx); retried forever.
    retry_max: float = Field(default=60.0, ge=0.5, le=3600)
    # Wait between attempts after 401/403/404: a wrong key or URL does not fix itself fast.
    auth_retry: float = Field(default=60.0, ge=0.1, le=3600)
    # With several intakes: this intake's share of the spool (its own directory), in bytes;
    # unset: spool.max_size divided equally among the intakes.
    spool_max_size: int | None = Field(default=None, ge=64 * KIB, le=MAX_SIZE_LIMIT)
    dry_run: bool = False

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value.startswith("http://"):
            host = value[7:].split("/", 1)[0].rsplit(":", 1)[0].strip("[]")
            # Plain HTTP would carry the key in clear text; only a local TLS-terminating
            # proxy (stunnel and the like) on this host is allowed.
            if host not in ("127.0.0.1", "localhost", "::1"):
                raise ValueError(f"{value!r} must start with https:// (the key is a secret)")
        elif not value.startswith("https://"):
            raise ValueError(f"{value!r} must start with https://")
        problem = _url_problem(value)
        if problem:
            raise ValueError(f"{value!r}: {problem}")
        return value.rstrip("/")

    @field_validator("proxy")
    @classmethod
    def _proxy(cls, value: str | None) -> str | None:
        # "" (an emptied environment variable) means no proxy, as for HTTPS_PROXY.
        if not value:
            return None
        # httpx speaks SOCKS only with the optional socksio package, which we do not ship.
        # The value is not echoed: a proxy URL may hold a password.
        scheme = value.partition("://")[0].lower() if "://" in value else ""
        if scheme not in ("http", "https"):
            raise ValueError("must be an http:// or https:// URL, e.g. "
                             "\"http://proxy.example:3128\" (SOCKS is not supported)")
        problem = _url_problem(value)
        if problem:
            raise ValueError(f"not a valid proxy URL: {problem}")
        return value

    @field_validator("key")
    @classmethod
    def _key(cls, value: SecretStr | None) -> SecretStr | None:
        # Never echo the key back: the message names the rule, not the value.
        if value is not None and not value.get_secret_value().isalnum():
            raise ValueError("the intake key must be alphanumeric (as shown in Sekoia.io)")
        return value

    @field_validator("ca_file")
    @classmethod
    def _ca_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{str(value)!r} is not a readable file")
        if value is not None:
            # Loaded now, as the client will: a wrong file is a config error, not a failed start.
            try:
                ssl.create_default_context().load_verify_locations(cafile=str(value))
            except ssl.SSLError:
                raise ValueError(f"{str(value)!r} holds no PEM certificate") from None
            except OSError as exc:
                raise ValueError(f"{str(value)!r}: {exc.strerror}") from None
        return value

    @model_validator(mode="after")
    def _key_from_file(self) -> IntakeConfig:
        if self.key_file is None:
            return self
        if self.key is not None:
            raise ValueError("set either intake.key or intake.key_file, not both")
        self.key = SecretStr(read_key_file(self.key_file))
        return self

    @model_validator(mode="after")
    def _region(self) -> IntakeConfig:
        if self.region is not None:
            # An explicit url equal to the default (as in the shipped example) is no conflict.
            if self.url not in (DEFAULT_URL, REGIONS[self.region]):
                raise ValueError("set either intake.url or intake.region, not both")
            self.url = REGIONS[self.region]
        return self

    @property
    def endpoint_url(self) -> str:
        return self.url + ENDPOINT_PATHS[self.endpoint]


# Intake names are label values, directory names (the spool's share) and log fields; lower
# case only, as the environment's HAPROXY_FORWARDER_INTAKES__<NAME>__KEY reaches them
# (variables are read case-insensitively, as lower case).
INTAKE_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
# The name of the one intake a config with a single [intake] table has.
DEFAULT_INTAKE = "default"


def _as_list(value: Any) -> Any:
    """A matcher may be one string or a list of them."""
    return [value] if isinstance(value, str) else value


class RouteConfig(_Section):
    """One [[routes]] entry: every matcher given must match (an empty one matches anything);
    the first route that matches wins. See routing.py."""

    listener: list[str] = Field(default_factory=list)
    source: list[str] = Field(default_factory=list)
    tls_name: list[str] = Field(default_factory=list)
    program: list[str] = Field(default_factory=list)
    intake: str | None = None
    drop: bool = False

    _lists = field_validator("listener", "source", "tls_name", "program",
                             mode="before")(_as_list)

    @field_validator("source")
    @classmethod
    def _cidrs(cls, values: list[str]) -> list[str]:
        return ListenConfig._cidrs(values)

    @field_validator("listener", "tls_name", "program")
    @classmethod
    def _non_empty(cls, values: list[str]) -> list[str]:
        if any(not v for v in values):
            raise ValueError("holds an empty string (an empty list matches anything)")
        return values

    @model_validator(mode="after")
    def _one_target(self) -> RouteConfig:
        if (self.intake is None) == (not self.drop):
            raise ValueError("needs exactly one of intake = \"NAME\" or drop = true")
        return self

    def route(self) -> Route:
        return Route(
            listener=tuple(self.listener),
            source=tuple(ipaddress.ip_network(v, strict=False) for v in self.source),
            tls_name=tuple(self.tls_name), program=tuple(self.program),
            intake=None if self.drop else self.intake)


def segment_size(max_size: int) -> int:
    """The segment files of a spool of `max_size` bytes (an intake's share): several per
    spool, so acked space comes back before the spool is full."""
    return max(16 * KIB, min(32 * MIB, max_size // 8))


class SpoolConfig(_Section):
    dir: Path = Path("/var/lib/haproxy-forwarder")
    # "overflow": disk only when a batch cannot be delivered at once; "always": write-ahead,
    # every batch is on disk before it is sent (a crash loses at most the open batch).
    mode: Literal["overflow", "always"] = "overflow"
    # Bounded (1 PiB) so a typo of many digits is a config error, not an overflow later.
    max_size: int = Field(default=1024 * MIB, ge=64 * KIB, le=MAX_SIZE_LIMIT)
    # "block": hold input back (TCP stops reading, UDP dropped and counted);
    # "drop_oldest": delete the oldest segments, counted and logged.
    when_full: Literal["block", "drop_oldest"] = "block"
    dead_letter_max_size: int = Field(default=256 * MIB, ge=64 * KIB, le=MAX_SIZE_LIMIT)

    @field_validator("dir", mode="before")
    @classmethod
    def _dir(cls, value: Any) -> Any:
        # Caught here, either would be a traceback at start (Path("") is the working dir).
        if isinstance(value, str) and (not value or "\0" in value):
            raise ValueError("must be a directory path (not empty, no NUL byte)")
        return value


class StatusConfig(_Section):
    # GET /metrics (Prometheus) and /healthz; "" disables. Loopback by default: it is not
    # authenticated.
    listen: str = "127.0.0.1:9514"
    # /healthz turns 503 when there is a backlog and nothing was delivered for this long.
    stall_after: float = Field(default=300.0, gt=0)

    @field_validator("listen")
    @classmethod
    def _address(cls, value: str) -> str:
        return _check_hostport(value) if value else value


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    # "auto": JSON, or the console renderer when stderr is a terminal.
    format: Literal["auto", "json", "console"] = "auto"
    stats_interval: float = Field(default=60.0, gt=0)

    @field_validator("level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        case_sensitive=False,
    )

    listen: ListenConfig = Field(default_factory=ListenConfig)
    tls: TlsConfig = Field(default_factory=TlsConfig)
    relp: RelpConfig = Field(default_factory=RelpConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    intake: IntakeConfig = Field(default_factory=IntakeConfig)
    # Several intakes ([intakes.NAME], each what [intake] holds) and the routes to them; a
    # config with [intake] alone has one intake, "default", and one catch-all route.
    intakes: dict[str, IntakeConfig] = Field(default_factory=dict)
    routes: list[RouteConfig] = Field(default_factory=list)
    spool: SpoolConfig = Field(default_factory=SpoolConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    status: StatusConfig = Field(default_factory=StatusConfig)
    shutdown_timeout: float = Field(default=10.0, ge=0, le=3600)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init kwargs; the environment wins over it.
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _tls_files(self) -> Settings:
        # Loaded now as the listeners will load them: a bad certificate is a config error
        # (exit 2, or reload_failed on SIGHUP), not a failed start.
        problem = tls_problem(self.tls, self.tls_needed)
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _intakes(self) -> Settings:
        if not self.intakes:
            if self.routes:
                raise ValueError("routes: [[routes]] need [intakes.NAME] tables (with a single "
                                 "[intake], every event goes to it)")
            return self
        problems = [f"intakes.{name}: not a valid name (lower-case letters, digits, '_', "
                    "'-', '.'; at most 63)" for name in self.intakes
                    if not INTAKE_NAME.fullmatch(name)]
        shares = sum(c.spool_max_size or 0 for c in self.intakes.values())
        if shares > self.spool.max_size:
            problems.append(f"intakes: the spool_max_size of the intakes add up to {shares} "
                            f"bytes, more than spool.max_size ({self.spool.max_size})")
        if self.intake.model_fields_set - {"dry_run"}:
            problems.append("intake: set either [intake] (one intake) or [intakes.NAME] "
                            "tables, not both")
        if len(self.intakes) > 1 and not self.routes:
            problems.append("routes: several [intakes.NAME] need [[routes]] saying which "
                            "events go where")
        if problems:
            raise ValueError("\n".join(problems))
        if self.intake.dry_run:  # --dry-run: every intake prints instead of sending
            for cfg in self.intakes.values():
                cfg.dry_run = True
        errors, _ = self.route_check()
        if errors:
            raise ValueError("\n".join(errors))
        return self

    @property
    def intake_table(self) -> dict[str, IntakeConfig]:
        """Every intake by name: [intakes.NAME], or {"default": [intake]}."""
        return dict(self.intakes) if self.intakes else {DEFAULT_INTAKE: self.intake}

    @property
    def route_list(self) -> tuple[Route, ...]:
        """The routes in force: [[routes]], or one catch-all to the only intake."""
        if self.routes:
            return tuple(r.route() for r in self.routes)
        return (Route(intake=next(iter(self.intake_table))),)

    def route_check(self) -> tuple[list[str], list[str]]:
        """Problems of the route table (refused) and warnings (an intake no route reaches)."""
        listeners = [(kind, a) for kind in ("tcp", "udp", "tls", "relp")
                     for a in getattr(self.listen, kind)]
        return check_routes(self.route_list, list(self.intake_table), self.filter.programs,
                            listeners)

    @property
    def dry_run(self) -> bool:
        return self.intake.dry_run

    @property
    def tls_needed(self) -> bool:
        """Some listener will do TLS handshakes: listen.tls, or RELP with relp.tls."""
        return bool(self.listen.tls) or (self.relp.tls and bool(self.listen.relp))

    def require_key(self) -> None:
        """A real run (not dry-run) cannot start without an intake key."""
        if self.dry_run:
            return
        if not self.intakes:
            if self.intake.key is None:
                raise ConfigError(["intake.key: missing: set it in the config file or "
                                   "HAPROXY_FORWARDER_INTAKE__KEY (or use --dry-run)"])
            return
        missing = [f"intakes.{name}.key: missing: set key or key_file (or use --dry-run)"
                   for name, cfg in self.intakes.items() if cfg.key is None]
        if missing:
            raise ConfigError(missing)

    def intake_keys(self) -> list[str]:
        """Every intake key, to be masked wherever it could be printed."""
        return [cfg.key.get_secret_value() for cfg in self.intake_table.values()
                if cfg.key is not None]

    def redacted(self) -> dict[str, Any]:
        """The effective config as plain data, with the keys masked."""
        data = self.model_dump(mode="json")
        if self.intake.key is not None:
            data["intake"]["key"] = MASK
        for name, cfg in self.intakes.items():
            if cfg.key is not None:
                data["intakes"][name]["key"] = MASK
        return data


def config_path(cli_value: str | None) -> tuple[Path, bool]:
    """The config file to read, and whether it was asked for explicitly."""
    if cli_value:
        return Path(cli_value), True
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env), True
    return Path(DEFAULT_CONFIG_PATH), False


def _format_error(err: Any) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "config"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if not err["loc"] and re.match(r"[a-z_]+(\[\d+\])?(\.[a-z_]+[ :]|: |\.[^ ]+: )", msg):
        # A check across sections names its setting itself ("tls.cert_file: ...", one line
        # per problem: "routes[2]: ...", "intakes.eu-1: ...").
        return msg
    if err["type"] == "extra_forbidden":
        msg = "unknown key (misspelt?)"
    # pydantic's message never contains the input value, so the key cannot leak through here.
    return f"{loc}: {msg}"


# What Kubernetes puts in every pod's environment for a Service named haproxy-forwarder[-x]
# (service links: HAPROXY_FORWARDER_SERVICE_HOST, HAPROXY_FORWARDER_X_PORT_1514_TCP_ADDR...):
# never a setting (those have a double underscore), so not refused as a misspelt one.
SERVICE_LINK = re.compile(
    rf"{ENV_PREFIX[:-1]}(_[A-Z0-9]+)*?_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?"
    r"|PORT(_\d+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?)?)")


def _unknown_env() -> list[str]:
    """HAPROXY_FORWARDER_* variables that name no setting: a typo must not pass silently."""
    known = {f"{ENV_PREFIX}{name}".upper() for name in Settings.model_fields} | {CONFIG_ENV}
    # Not settings: they choose the implementation (like AIOHTTP_NO_EXTENSIONS), at install
    # time and at run time, before any config is read.
    known |= {f"{ENV_PREFIX}NO_EXTENSIONS", f"{ENV_PREFIX}EXPECT_COMPILED"}
    for name, field in Settings.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            known |= {f"{ENV_PREFIX}{name}__{key}".upper() for key in section.model_fields}
    # An intake of [intakes.NAME]: HAPROXY_FORWARDER_INTAKES__<NAME>__<KEY> (the name in any
    # case: variables are read case-insensitively, and names are matched so).
    per_intake = re.compile(
        rf"{ENV_PREFIX}INTAKES__[A-Z0-9][A-Z0-9_.-]*__("
        + "|".join(k.upper() for k in IntakeConfig.model_fields) + ")")
    return sorted(
        f"{var}: unknown setting (misspelt? the form is "
        f"{ENV_PREFIX}<SECTION>__<KEY>, with a double underscore)"
        for var in os.environ
        if var.upper().startswith(ENV_PREFIX) and var.upper() not in known
        and not per_intake.fullmatch(var.upper()) and not SERVICE_LINK.fullmatch(var.upper())
    )


def _bad_env_json(field: str) -> list[str]:
    prefix = f"{ENV_PREFIX}{field}".upper()
    names = sorted(v for v in os.environ if v.upper().startswith(prefix))
    return [
        f"{name} ({name[len(ENV_PREFIX):].lower().replace('__', '.')}): not valid JSON "
        f"(lists are written as JSON, e.g. '[\"0.0.0.0:1514\"]')"
        for name in names
    ] or [f"environment: cannot parse the value for {field!r}"]


# Past this size a "config file" is a wrong path (a log, an image): refused, not read whole.
MAX_CONFIG_BYTES = 4 * MIB

_FILE_KINDS = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _read_config(path: Path) -> bytes | None:
    """The bytes of the config file; None if it does not exist. ConfigError (one line) if it
    cannot be used.

    Only a regular file is read. It is opened with O_NONBLOCK and checked on the descriptor
    (no window between a check and the open): opening a named pipe for reading would wait
    for a writer forever, and a SIGHUP with a FIFO swapped in froze the daemon. A file with
    nothing but whitespace is refused: it is a file cut while an editor or a deployment
    rewrote it far more often than a wish for every default (then the intake URL falls back
    to fra1 and the TLS and RELP listeners close). A file holding only a comment is the way
    to say "defaults and the environment"."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except PermissionError:
        raise ConfigError([f"{path}: permission denied"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot be opened: {exc.strerror or exc}"]) from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ConfigError([f"{path}: is a directory, not a config file"])
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a file")
            raise ConfigError([f"{path}: is {kind}, not a regular file: the config is read "
                               "only from a regular file"])
        data = os.read(fd, MAX_CONFIG_BYTES + 1)
        while len(data) <= MAX_CONFIG_BYTES and (more := os.read(fd, 1 << 16)):
            data += more  # os.read may return less than asked before the end
    except OSError as exc:
        raise ConfigError([f"{path}: cannot be read: {exc.strerror or exc}"]) from None
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{path}: larger than {MAX_CONFIG_BYTES // MIB} MiB: not a config "
                           "file"])
    if not data.strip():
        raise ConfigError([f"{path}: is empty (a file cut while being rewritten?); to run on "
                           "the defaults and the environment, write at least a comment in it"])
    return data


def load(cli_value: str | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Read the TOML file (optional when not named explicitly), apply env, validate."""
    path, explicit = config_path(cli_value)
    data: dict[str, Any] = {}
    raw = _read_config(path)
    if raw is None and explicit:
        raise ConfigError([f"{path}: config file not found"])
    try:
        if raw is not None:
            data = tomllib.loads(raw.decode("utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: {exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    for section, values in (overrides or {}).items():
        data.setdefault(section, {}).update(values)
    unknown = _unknown_env()
    if unknown:
        raise ConfigError(unknown)
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError([line for e in exc.errors()
                           for line in _format_error(e).split("\n")]) from None
    except SettingsError as exc:
        # Raised for an environment value that is not valid JSON where a list is expected;
        # pydantic-settings names the field in quotes: point at the variable instead.
        match = re.search(r'field "([^"]+)"', str(exc))
        raise ConfigError(_bad_env_json(match.group(1) if match else "")) from None
