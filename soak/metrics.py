"""/metrics scraped and read: samples by name and labels, sums, the accounting identity."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass, field

PREFIX = "haproxy_forwarder_"

IN = ("accepted_events_total", "spool_recovered_events_total", "requeued_events_total")
OUT = ("delivered_events_total", "dead_lettered_events_total", "dropped_events_total")


@dataclass
class Scrape:
    """One /metrics answer: `samples[name][labels]` (labels as their text, "" for none)."""

    t: float
    samples: dict[str, dict[str, float]] = field(default_factory=dict)

    def get(self, name: str, default: float = 0.0) -> float:
        """The sum over labels of `haproxy_forwarder_<name>`."""
        values = self.samples.get(PREFIX + name)
        return sum(values.values()) if values else default

    def has(self, name: str) -> bool:
        return PREFIX + name in self.samples

    def by_label(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for labels, value in self.samples.get(PREFIX + name, {}).items():
            for part in labels.split(","):
                k, _, v = part.partition("=")
                if k == label:
                    out[v.strip('"')] = out.get(v.strip('"'), 0.0) + value
        return out

    def identity(self) -> dict[str, int]:
        came = sum(int(self.get(n)) for n in IN)
        went = sum(int(self.get(n)) for n in OUT)
        held = int(self.get("events_held"))
        return {"in": came, "out": went, "held": held, "unaccounted": came - went - held,
                "gauge": int(self.get("events_unaccounted", float("nan")))
                if self.has("events_unaccounted") else -1}


def parse(text: str, t: float) -> Scrape:
    s = Scrape(t)
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name_labels, _, value = line.rpartition(" ")
        if "{" in name_labels:
            name, _, labels = name_labels.partition("{")
            labels = labels.rstrip("}")
        else:
            name, labels = name_labels, ""
        try:
            s.samples.setdefault(name, {})[labels] = float(value)
        except ValueError:
            continue
    return s


def scrape(port: int, t: float, timeout: float = 2.0) -> Scrape | None:
    """None when the endpoint does not answer (starting, stopping, killed)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
            return parse(r.read().decode(), t)
    except (OSError, ValueError):
        return None
