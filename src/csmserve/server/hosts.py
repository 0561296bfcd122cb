"""Which ``Host`` names the server answers for: the defence against DNS rebinding.

A web page on ``evil.example`` whose DNS name is re-pointed at 127.0.0.1 reaches a server on the
visitor's machine as a same-origin request: ``Origin`` and ``Host`` both say ``evil.example``, so
the Origin check passes. With API keys the page has no key; without keys the ``Host`` is what is
left to check. The rule (``CSM_ALLOWED_HOSTS``):

* Set: only those names (``name``, ``.example.com`` for it and its subdomains, ``*`` for any), plus
  IP addresses and ``localhost`` (a rebinding page always comes by a name of its own), with or
  without keys.
* Unset, keys off, bound to a loopback address: IP addresses and ``localhost`` (``*.localhost``).
* Unset otherwise (keys on, or bound to ``0.0.0.0`` or another address that other machines use,
  as a container is, reached by names nobody listed): any name; with keys off the server warns
  at start-up.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from csmserve.config import Settings


def is_loopback(address: str) -> bool:
    """Whether a listen address is loopback only (``127.0.0.1``, ``::1``, ``localhost``)."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name in a ``Host`` header, lower case, without port, brackets or a final dot."""
    header = header.strip().lower()
    if header.startswith("["):  # [::1]:8000
        return header[1 : header.find("]")] if "]" in header else header
    name = header.rsplit(":", 1)[0] if header.count(":") == 1 else header
    return name.rstrip(".")


def is_address_or_localhost(name: str) -> bool:
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class HostRule:
    """``names`` the server answers for besides addresses and localhost; ``None``: any name."""

    names: tuple[str, ...] | None

    @classmethod
    def from_settings(cls, settings: Settings, *, keys: bool) -> HostRule:
        allowed = tuple(name.lower().rstrip(".") for name in settings.allowed_hosts)
        if allowed:
            return cls(None if "*" in allowed else allowed)
        if not keys and is_loopback(settings.host):
            return cls(())
        return cls(None)

    def allows(self, header: str | None) -> bool:
        """Whether a request whose ``Host`` is ``header`` may be served (no header: HTTP/1.0, yes)."""
        if self.names is None or header is None:
            return True
        name = host_name(header)
        return is_address_or_localhost(name) or any(_listed(name, allowed) for allowed in self.names)


def _listed(name: str, allowed: str) -> bool:
    """``name`` is ``allowed``, or ``allowed`` is ``.domain`` and ``name`` is it or below it."""
    if allowed.startswith("."):
        return name == allowed[1:] or name.endswith(allowed)
    return name == allowed
