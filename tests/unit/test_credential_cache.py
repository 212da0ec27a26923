"""The credential cache: entries expire by its clock, can be forgotten at once, and can be turned off."""

from __future__ import annotations

from server.domain.models import Device
from server.services.credentials import CredentialCache


def _device(name: str = "cam") -> Device:
    return Device(federation_id="f", name=name, modalities=frozenset({"image"}), secret_hash="h")


def test_an_entry_is_returned_until_its_ttl_has_passed() -> None:
    now = [100.0]
    cache = CredentialCache(ttl_s=30, clock=lambda: now[0])
    device = _device()
    cache.put(device)
    now[0] = 129.9
    assert cache.get(device.id) is device
    now[0] = 130.0
    assert cache.get(device.id) is None
    assert cache.prune() == 0


def test_forget_drops_an_entry_at_once() -> None:
    cache = CredentialCache(ttl_s=30)
    device = _device()
    cache.put(device)
    cache.forget(device.id)
    assert cache.get(device.id) is None
    cache.forget("never-seen")  # forgetting an unknown device is not an error


def test_prune_drops_only_expired_entries() -> None:
    now = [0.0]
    cache = CredentialCache(ttl_s=10, clock=lambda: now[0])
    old, new = _device("old"), _device("new")
    cache.put(old)
    now[0] = 5.0
    cache.put(new)
    now[0] = 12.0
    assert cache.prune() == 1
    assert cache.get(old.id) is None and cache.get(new.id) is new


def test_a_zero_ttl_remembers_nothing() -> None:
    cache = CredentialCache(ttl_s=0)
    device = _device()
    cache.put(device)
    assert cache.get(device.id) is None


def test_a_refresh_is_claimed_once_past_half_the_ttl_and_again_after_a_put() -> None:
    now = [0.0]
    cache = CredentialCache(ttl_s=30, clock=lambda: now[0])
    device = _device()
    cache.put(device)
    now[0] = 14.9
    assert cache.claim_refresh(device.id) is False
    now[0] = 15.0
    assert cache.claim_refresh(device.id) is True
    assert cache.claim_refresh(device.id) is False  # one caller refreshes; the others keep answering
    assert cache.get(device.id) is device  # still valid until the TTL
    cache.put(device)  # the refresh landed
    assert cache.claim_refresh(device.id) is False
    now[0] = 30.0
    assert cache.claim_refresh(device.id) is True
    assert cache.claim_refresh("unknown") is False
