"""Observability: the counter registry, the status endpoint (/metrics, /healthz), logs.

One place for what operators read; every component writes to the same registry.
"""
