"""`python -m haproxy_forwarder` is the same as the `haproxy-forwarder` command."""

import sys

from .cli import main

sys.exit(main())
