"""haproxy-forwarder: HAProxy syslog in, Sekoia.io intake out."""

__version__ = "0.1.0"
