"""Settings that are valid and work, but put events or the endpoint at risk.

`check-config` prints each as one `warning:` line and still exits 0: these are choices an
operator may make on purpose, so they are said, never refused. Each line names the setting,
the risk and what to do. What the defaults already accept (kill -9 loses the in-memory
batches of `overflow` mode, UDP drops under backpressure) is documented, not warned about.
"""

from __future__ import annotations

import ipaddress

from .config import IntakeConfig, Settings
from .routing import describe


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may well resolve to a public address


def _risky_intake(p: str, intake: IntakeConfig) -> list[str]:
    """The risky settings of one intake; `p` is how the config names it ("intake",
    "intakes.eu")."""
    out: list[str] = []
    if intake.dry_run:
        out.append(f"{p}.dry_run = true: `run` prints events on stdout and sends nothing to "
                   "the intake (no spool either); set it to false to forward")
    if intake.url.startswith("http://"):
        # config.py only lets plain HTTP through to a loopback address.
        out.append(f"{p}.url = {intake.url} is plain HTTP: the key and events travel "
                   "unencrypted to that local port; make sure what listens there forwards "
                   "them over TLS")
    if intake.ca_file is not None:
        out.append(f"{p}.ca_file = {intake.ca_file}: any certificate this CA signs is "
                   "trusted as the intake (besides the system CAs); keep it only for a "
                   "TLS-inspecting proxy you run, and protect the file")
    if intake.insecure_skip_verify:
        out.append(f"{p}.insecure_skip_verify = true: the intake's certificate is not checked, "
                   f"so anyone on the path can read the key and the events; use {p}.ca_file "
                   "for a private CA instead")
    if intake.concurrency > 1 and intake.endpoint != "array":
        # With `array` every event carries its own time, so Sekoia's timeline is right whatever
        # the order of arrival; the other endpoints are stamped as they arrive.
        out.append(f"{p}.concurrency = {intake.concurrency} with endpoint "
                   f"\"{intake.endpoint}\": batches, even from one connection, may reach the "
                   "intake out of order and these events carry no timestamp of their own; set "
                   f"{p}.concurrency = 1 or endpoint = \"array\"")
    return out


def risky_settings(settings: Settings) -> list[str]:
    """One line per risky setting, in config-file order; empty for the defaults."""
    out: list[str] = []
    for name, intake in settings.intake_table.items():
        out += _risky_intake("intake" if not settings.intakes else f"intakes.{name}", intake)
    if settings.spool.when_full == "drop_oldest":
        out.append("spool.when_full = \"drop_oldest\": a full spool deletes its oldest events "
                   "(counted in spool_dropped_events, logged spool_full_dropped_oldest); "
                   "\"block\" holds input back instead, or raise spool.max_size")
        if settings.listen.relp:
            # Those events were answered rsp 200: their sender will never send them again.
            out.append("spool.when_full = \"drop_oldest\" with listen.relp: RELP messages "
                       "already acknowledged to their sender can be deleted from a full spool "
                       "and will not be resent; use \"block\" with RELP")
    if settings.listen.tls and settings.tls.client_ca_file is None:
        out.append("listen.tls without tls.client_ca_file: any client may send (the traffic is "
                   "encrypted, the sender not authenticated); set tls.client_ca_file (and "
                   "tls.allowed_names) to require client certificates")
    listen = settings.status.listen
    if listen and not _is_loopback(listen.rpartition(":")[0]):
        out.append(f"status.listen = {listen}: /metrics and /healthz have no authentication "
                   "and are reachable from the network; bind 127.0.0.1 or firewall the port")
    return out


def route_table_lines(settings: Settings) -> list[str]:
    """The route table in force, for `check-config`: a title line, then routing.describe()'s
    aligned lines (one per `[[routes]]` entry in order, then what no route matches unless the
    last route is a catch-all). Empty for a config without [[routes]]: its one [intake]
    takes every event, there is no table to show."""
    if not settings.routes:
        return []
    return ["routes, first match wins (listener  source  tls name  program → intake; "
            "* matches anything):", *describe(settings.route_list)]


def route_warnings(settings: Settings) -> list[str]:
    """What the route table does that may not be meant, one line each (the config is still
    valid): a `drop = true` route (its events are discarded, counted), an intake no route
    sends events to. The warnings of `Settings.route_check()`; its problems never get here,
    as they refuse the config."""
    return settings.route_check()[1]
