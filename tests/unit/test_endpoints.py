"""``mlecs.endpoints.with_port``: the gRPC targets an agent may be configured with, moved to another port."""

from __future__ import annotations

import pytest

from mlecs.endpoints import with_port


@pytest.mark.parametrize(("target", "expected"), [
    ("coordinator:50051", "coordinator:50052"),
    ("127.0.0.1:50051", "127.0.0.1:50052"),
    ("coordinator", "coordinator:50052"),
    ("[::1]:50051", "[::1]:50052"),
    ("::1", "[::1]:50052"),
    (" coordinator.example.com:443 ", "coordinator.example.com:50052"),
    ("dns:///coordinator.example.com:443", "dns:///coordinator.example.com:50052"),
    ("dns://10.0.0.53/coordinator.example.com:443", "dns://10.0.0.53/coordinator.example.com:50052"),
    ("ipv4:10.0.0.1:50051,10.0.0.2:50061", "ipv4:10.0.0.1:50052,10.0.0.2:50052"),
    ("ipv6:[::1]:50051,[fe80::1]:50051", "ipv6:[::1]:50052,[fe80::1]:50052"),
    ("ipv6:::1", "ipv6:[::1]:50052"),
])
def test_every_address_keeps_its_host_and_takes_the_new_port(target, expected):
    assert with_port(target, 50052) == expected


@pytest.mark.parametrize("target", ["unix:/run/mlecs.sock", "unix-abstract:mlecs", "vsock:3:50051",
                                    "xds:///coordinator", "ipv4:"])
def test_targets_without_a_port_have_no_heartbeat_endpoint(target):
    assert with_port(target, 50052) is None


@pytest.mark.parametrize("port", [0, -1, 65536])
def test_a_port_out_of_range_is_refused(port):
    with pytest.raises(ValueError, match="out of range"):
        with_port("coordinator:50051", port)


def test_an_address_without_a_host_is_refused():
    with pytest.raises(ValueError, match="no host"):
        with_port(":50051", 50052)
