"""Imported first by a test's child process: every connection or name lookup beyond this machine's loopback raises,
so that code which reaches for the network (a Hub download, a kernel fetch) fails loudly, not offline by luck."""

import socket

LOOPBACK = {"localhost", "127.0.0.1", "::1", None}


class NetworkBlocked(OSError):
    pass


_connect, _getaddrinfo = socket.socket.connect, socket.getaddrinfo


def _checked_connect(self, address, *args, **kwargs):
    if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOOPBACK:
        raise NetworkBlocked(f"network blocked by the test: connect to {address!r}")
    return _connect(self, address, *args, **kwargs)


def _checked_getaddrinfo(host, *args, **kwargs):
    if host not in LOOPBACK:
        raise NetworkBlocked(f"network blocked by the test: look up {host!r}")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect = _checked_connect
socket.socket.connect_ex = lambda self, address: _checked_connect(self, address) or 0
socket.getaddrinfo = _checked_getaddrinfo
