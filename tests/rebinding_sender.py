"""A real watchdog whose resolver changes its answer at every lookup (DNS rebinding): lookups of
REBIND_HOST answer the addresses of REBIND_ANSWERS (comma-separated) in turn, and each is
appended to the file REBIND_LOG. Run as `python -m tests.rebinding_sender`."""

import os
import runpy
import socket

_real_getaddrinfo = socket.getaddrinfo
_answers = os.environ["REBIND_ANSWERS"].split(",")
_lookups = 0


def _rebinding_getaddrinfo(host, port, *args, **kwargs):
    global _lookups
    if host in (os.environ["REBIND_HOST"], os.environ["REBIND_HOST"].encode()):
        host = _answers[_lookups % len(_answers)]
        _lookups += 1
        with open(os.environ["REBIND_LOG"], "a") as log:
            log.write(host + "\n")
    return _real_getaddrinfo(host, port, *args, **kwargs)


socket.getaddrinfo = _rebinding_getaddrinfo
runpy.run_module("core.batch_app.watchdog", run_name="__main__", alter_sys=True)
