"""Choosing among several trainers without a scheduler: where a new session goes.

An :class:`~lasagne_engine.client.Engine` given several trainer addresses asks each trainer for
its devices (``GetDevices``) and tries them in the order :func:`placement_order` returns. A device
holds one session at a time and its free memory is its budget less the memory its sessions are
estimated to use, so a trainer with an idle device comes first, the one whose idle device has the
most free memory first among those, and then the others by their most free memory, where the
session would queue.
"""

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence

from lasagne_engine.v1 import trainer_pb2

__all__ = ["TRAINER_ADDRESSES_VARIABLE", "TrainerCapacity", "capacity", "placement_order", "trainer_addresses"]

TRAINER_ADDRESSES_VARIABLE = "LASAGNE_ENGINE_TRAINER_ADDRESSES"


def trainer_addresses(
    trainer_address: str | None,
    addresses: Sequence[str] | None,
    environ: Mapping[str, str] | None = None,
) -> tuple[str, ...] | None:
    """Return the trainers an Engine places sessions on, or None for the one default trainer.

    ``addresses`` wins; without it, ``LASAGNE_ENGINE_TRAINER_ADDRESSES`` (comma-separated) is read,
    unless ``trainer_address`` names a single trainer.

    Raises
    ------
    ValueError
        If the list is empty, repeats an address, or leaves out ``trainer_address``.
    """
    environ = os.environ if environ is None else environ
    if addresses is None:
        if trainer_address is not None or not environ.get(TRAINER_ADDRESSES_VARIABLE):
            return None
        addresses = [address.strip() for address in environ[TRAINER_ADDRESSES_VARIABLE].split(",") if address.strip()]
        source = TRAINER_ADDRESSES_VARIABLE
    else:
        if isinstance(addresses, str):
            raise ValueError(f"trainer_addresses={addresses!r} must be a list of host:port strings, not one string.")
        addresses = list(addresses)
        source = "trainer_addresses"
    if not addresses:
        raise ValueError(f"{source} is empty; give at least one trainer as host:port.")
    repeated = sorted({address for address in addresses if addresses.count(address) > 1})
    if repeated:
        raise ValueError(f"{source} lists {repeated[0]!r} more than once; give each trainer once.")
    if trainer_address is not None and trainer_address not in addresses:
        raise ValueError(
            f"trainer_address={trainer_address!r} is not in {source} {addresses!r}; give one of them or leave it out."
        )
    return tuple(addresses)


@dataclasses.dataclass(frozen=True)
class TrainerCapacity:
    """Free capacity of one trainer now, from its ``GetDevices`` response.

    Attributes
    ----------
    address : str
        The trainer.
    idle_free_bytes : int or None
        Most free memory of a device without a session; None when every device is busy.
    free_bytes : int
        Most free memory of any device, busy or not.
    """

    address: str
    idle_free_bytes: int | None
    free_bytes: int


def capacity(
    address: str, response: trainer_pb2.GetDevicesResponse, device: str = ""
) -> TrainerCapacity | None:
    """Summarize a trainer's devices, or only ``device`` when it is named; None if the trainer lacks it."""
    devices = [entry for entry in response.devices if not device or entry.name == device]
    if not devices:
        return None
    free = [entry.memory_budget_bytes - entry.memory_used_bytes for entry in devices]
    idle = [entry.memory_budget_bytes - entry.memory_used_bytes for entry in devices if not entry.session_ids]
    return TrainerCapacity(address=address, idle_free_bytes=max(idle) if idle else None, free_bytes=max(free))


def placement_order(capacities: Iterable[TrainerCapacity]) -> list[str]:
    """Return the trainers' addresses in the order to try: idle devices first, then by free memory.

    Ties keep the order in which the trainers were given.
    """
    ranked = sorted(
        enumerate(capacities),
        key=lambda item: (
            item[1].idle_free_bytes is None,
            -(item[1].idle_free_bytes if item[1].idle_free_bytes is not None else item[1].free_bytes),
            item[0],
        ),
    )
    return [entry.address for _, entry in ranked]
