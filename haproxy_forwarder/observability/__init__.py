"""Observability: the counter registry, its Prometheus collector, the status endpoint
(/metrics, /healthz, /readyz), logs.

One place for what operators read; every component writes to the same registry.
"""
