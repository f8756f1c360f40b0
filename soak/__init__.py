"""A chaos soak with an event ledger: `make soak` / `python -m soak --minutes N --seed S`.

The real daemon (devtools/daemon.py) under a fault schedule drawn from the seed (kill -9,
SIGTERM and restart, SIGHUP with a changed config, an intake answering 5xx/429/400/413,
slowly or not at all, a small spool filling up under block and drop_oldest, a byte flipped in
a sealed segment), senders on TCP, RELP (real rsyslog omrelp) and UDP with an id in every
event; at the end every event is delivered, dead-lettered or lost for a cause that is
counted, or the run fails. docs/reliability.md says what it proves. Development tooling: not
part of the wheel.
"""
