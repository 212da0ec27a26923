"""gRPC target strings: the same host(s) on another port.

The coordinator advertises its heartbeat endpoint as a port on the host the device already reaches
(``EnrolResponse.heartbeat_port``), so that it needs no address of its own in configuration, the TLS
name a device checks stays the same, and any proxy or DNS name in front of the coordinator keeps working.
"""

from __future__ import annotations

_LIST_SCHEMES = ("ipv4:", "ipv6:")
_NAME_SCHEMES = ("dns:///", "dns:")


def _host_with_port(hostport: str, port: int) -> str:
    """``host:port``, ``[v6]:port``, ``host`` or ``[v6]`` with the port replaced (or added)."""
    if hostport.startswith("["):
        host = hostport[: hostport.index("]") + 1]
    elif hostport.count(":") == 1:
        host = hostport.partition(":")[0]
    elif ":" in hostport:  # an IPv6 address without brackets carries no port (gRPC's naming rules)
        host = f"[{hostport}]"
    else:
        host = hostport
    if not host:
        raise ValueError(f"no host in {hostport!r}")
    return f"{host}:{port}"


def with_port(target: str, port: int) -> str | None:
    """``target`` with every address's port replaced by ``port``; None for targets without ports
    (``unix:`` sockets and other schemes), where the caller keeps using ``target`` itself.

    >>> with_port("coordinator:50051", 50052)
    'coordinator:50052'
    >>> with_port("ipv4:10.0.0.1:50051,10.0.0.2:50051", 50052)
    'ipv4:10.0.0.1:50052,10.0.0.2:50052'
    """
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range")
    target = target.strip()
    for scheme in _LIST_SCHEMES:
        if target.startswith(scheme):
            addresses = [a.strip() for a in target[len(scheme):].split(",") if a.strip()]
            if not addresses:
                return None
            return scheme + ",".join(_host_with_port(a, port) for a in addresses)
    for scheme in _NAME_SCHEMES:
        if target.startswith(scheme):
            rest = target[len(scheme):]
            if "/" in rest:  # dns://authority/host:port names a DNS server: keep it
                authority, _, hostport = rest.rpartition("/")
                return f"{scheme}{authority}/{_host_with_port(hostport, port)}"
            return scheme + _host_with_port(rest, port)
    if "://" in target or target.startswith(("unix:", "unix-abstract:", "vsock:")):
        return None
    return _host_with_port(target, port)
