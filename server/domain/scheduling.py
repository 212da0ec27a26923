"""Pure scheduling rules: whom to invite to a round, and what an unfinished round should do next.

Kept free of I/O so every rule is unit-tested directly; ``server.services.rounds`` applies them.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum


def invitation_count(eligible: int, clients_per_round: int, overselect: float) -> tuple[int, int]:
    """(devices to invite, updates to commit with) for a synchronous round.

    ``clients_per_round`` 0 invites every eligible device and waits for all of them. Otherwise
    ceil(target x (1 + overselect)) are invited, capped by how many are eligible, and the round commits
    as soon as ``target`` (or, with fewer devices, every invited one) have arrived.
    """
    if clients_per_round <= 0:
        return eligible, eligible
    invited = min(eligible, math.ceil(clients_per_round * (1 + overselect) - 1e-9))
    return invited, min(clients_per_round, invited)


def select_participants(candidates: Sequence[tuple[str, frozenset[str]]], count: int, seed: int) -> list[str]:
    """``count`` device ids drawn so that every modality set is represented as evenly as possible.

    Devices are grouped by modality set; the groups take turns (in a seeded random order) giving one
    randomly drawn device each, so a rare modality set is not crowded out by a common one.
    """
    rng = random.Random(seed)
    groups: dict[frozenset[str], list[str]] = defaultdict(list)
    for device_id, modalities in sorted(candidates):
        groups[modalities].append(device_id)
    queues = [rng.sample(ids, len(ids)) for _, ids in sorted(groups.items(), key=lambda kv: sorted(kv[0]))]
    rng.shuffle(queues)
    chosen: list[str] = []
    while len(chosen) < count and any(queues):
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(queue.pop())
    return sorted(chosen)


class Action(StrEnum):
    WAIT = "wait"
    AGGREGATE = "aggregate"
    FAIL = "fail"


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str


def decide(*, accepted: int, target: int, min_updates: int, past_deadline: bool,
           pending_online: int | None) -> Decision:
    """What a round collecting updates does now.

    ``target``: updates that close the round at once. ``pending_online``: invited devices with no update
    yet that are still alive (None when unknown, e.g. presence is unavailable, or in async mode). Once
    the quorum is met and nobody pending is alive, the others are not worth waiting for.
    """
    if accepted >= max(target, 1):
        return Decision(Action.AGGREGATE, f"{accepted} of {target} targeted updates arrived")
    if accepted >= min_updates and pending_online == 0:
        return Decision(Action.AGGREGATE, f"quorum of {min_updates} met and the devices still missing are offline")
    if past_deadline:
        if accepted >= min_updates:
            return Decision(Action.AGGREGATE, f"deadline reached with {accepted} updates (quorum {min_updates})")
        return Decision(Action.FAIL, f"deadline passed with {accepted} of {min_updates} required updates")
    return Decision(Action.WAIT, f"{accepted} of {target} updates so far")


def could_close(*, accepted: int, target: int, min_updates: int) -> bool:
    """Whether ``decide`` could aggregate with this many updates, whatever the deadline and presence say:
    the target or the quorum is met. Below both only the deadline can end the round, so an update that
    arrives then need not wake the scheduler (its periodic tick watches deadlines)."""
    return accepted >= min(max(target, 1), min_updates)


def staleness_weight(staleness: int, exponent: float) -> float:
    """FedBuff-style discount of an update trained ``staleness`` versions ago: (1 + s) ** -exponent."""
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    return float((1 + staleness) ** -exponent)
