"""Distributed helpers: one configuration on every rank, and the samples a ``DistributedSampler`` only repeats.

``DistributedSampler`` (as Lightning installs it for validation and test, ``drop_last=False``) pads the dataset to
``ceil(N / W) * W`` indices by repeating its first ones, then rank ``r`` takes positions ``r, r + W, r + 2W, ...``
of that list. Position ``p`` is a repeat exactly when ``p >= N``, whatever the shuffle: so the repeats are the LAST
samples a rank receives, and rank ``r`` has ``len(range(r, N, W))`` samples of its own.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DistributedSampler


def own_samples(sampler: Any) -> int | None:
    """How many of the samples this rank receives from ``sampler`` are the dataset's own (the rest are padding
    repeats), or None when that is not known: not a ``DistributedSampler`` (a custom sampler, an IterableDataset)."""
    if not isinstance(sampler, DistributedSampler):
        return None
    if sampler.drop_last:
        return sampler.num_samples  # no repeats: the tail is dropped instead
    return len(range(sampler.rank, len(sampler.dataset), sampler.num_replicas))  # type: ignore[arg-type]


def sampler_of(dataloader: Any) -> Any:
    """The sampler that orders a DataLoader's samples (through a batch sampler if there is one)."""
    sampler = getattr(dataloader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        return sampler
    return getattr(getattr(dataloader, "batch_sampler", None), "sampler", sampler)


def dataloaders_of(dataloaders: Any) -> list[Any]:
    """Lightning's ``val_dataloaders`` / ``test_dataloaders``: one loader, a list or dict of them, or None."""
    if dataloaders is None:
        return []
    if isinstance(dataloaders, Mapping):
        return list(dataloaders.values())
    return list(dataloaders) if isinstance(dataloaders, (list, tuple)) else [dataloaders]


def sample_mask(sampler: Any, start: int, count: int, device: torch.device | str | None = None) -> Tensor:
    """Which of ``count`` samples, starting at the ``start``-th this rank received from ``sampler`` in this pass,
    are the dataset's own (True) rather than ``DistributedSampler`` padding (False); all True for other samplers.

    For users of the metric alone (Fabric, plain ``torch.distributed``): pass it to ``PerceptionMSE.update(...,
    mask=...)`` and the result is the value over the dataset itself, on any number of processes.

    Example:
        >>> import torch
        >>> from torch.utils.data import DistributedSampler
        >>> sampler = DistributedSampler(range(7), num_replicas=2, rank=1, shuffle=False)  # 3 own + 1 repeat
        >>> sample_mask(sampler, start=2, count=2)
        tensor([ True, False])
    """
    own = own_samples(sampler)
    positions = torch.arange(start, start + count, device=device)
    return positions < own if own is not None else torch.ones(count, dtype=torch.bool, device=device)


def check_same_everywhere(
    configuration: Mapping[str, str], owner: str, group: Any = None, device: torch.device | None = None
) -> None:
    """Raise on every rank when ``configuration`` is not the same on all ranks (a collective: call it on all).

    One ``all_reduce`` of 2 numbers (a hash and its square: all equal iff ``world * sum(x**2) == sum(x)**2``); only
    on a mismatch are the configurations gathered, to name each differing setting with its value per rank.
    """
    digest = zlib.crc32(repr(sorted(configuration.items())).encode()) & 0xFFFFF
    device = collective_device(device, group)
    check = torch.tensor([digest, digest * digest], dtype=torch.int64, device=device)
    dist.all_reduce(check, group=group)
    world = dist.get_world_size(group)
    total, squares = check.tolist()
    if world * squares == total * total:
        return
    # every rank is here: the check's result is the same everywhere
    gathered = [json.loads(part) for part in all_gather_bytes(json.dumps(dict(configuration)).encode(), device, group)]
    raise RuntimeError(
        f"{owner}: the configuration differs between processes "
        f"({differences({f'rank {rank}': found for rank, found in enumerate(gathered)})}); every rank must build "
        f"the same {owner}"
    )


def collective_device(device: torch.device | str | None, group: Any = None) -> torch.device:
    """Where the group's collectives take their tensors: NCCL the rank's own CUDA device (``device``, the one the
    caller's work runs on; never ``torch.cuda.current_device()``, which is device 0 on a rank that never called
    ``set_device``), every other backend the CPU."""
    if dist.get_backend(group) == "nccl":
        if device is None or torch.device(device).type != "cuda":
            raise ValueError(f"an NCCL process group needs the rank's CUDA device for its collectives, got {device}")
        return torch.device(device)
    return torch.device("cpu")


def all_gather_bytes(payload: bytes, device: torch.device | str | None = None, group: Any = None) -> list[bytes]:
    """Every rank's ``payload`` on every rank, with tensor collectives on :func:`collective_device` (the sizes, then
    the bytes padded to the longest)."""
    device, world = collective_device(device, group), dist.get_world_size(group)
    size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    lengths = [int(s) for s in sizes]
    data = torch.zeros(max(lengths), dtype=torch.uint8, device=device)
    data[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else data[:0]
    parts = [torch.empty_like(data) for _ in range(world)]
    dist.all_gather(parts, data, group=group)
    return [part[:length].cpu().numpy().tobytes() for part, length in zip(parts, lengths, strict=True)]


def send_bytes(payload: bytes, dst: int, device: torch.device | str | None = None, group: Any = None) -> None:
    """Send ``payload`` to group rank ``dst`` (its size, then the bytes): pair with :func:`receive_bytes`."""
    device = collective_device(device, group)
    destination = dist.get_global_rank(group, dst) if group is not None else dst
    dist.send(torch.tensor([len(payload)], dtype=torch.int64, device=device), destination, group=group)
    dist.send(torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device), destination, group=group)


def receive_bytes(src: int, device: torch.device | str | None = None, group: Any = None) -> bytes:
    """The bytes group rank ``src`` sends with :func:`send_bytes`."""
    device = collective_device(device, group)
    source = dist.get_global_rank(group, src) if group is not None else src
    size = torch.empty(1, dtype=torch.int64, device=device)
    dist.recv(size, source, group=group)
    data = torch.empty(int(size), dtype=torch.uint8, device=device)
    dist.recv(data, source, group=group)
    return data.cpu().numpy().tobytes()


def differences(configurations: Mapping[str, Mapping[str, str] | None]) -> str:
    """``"hop_length is 256 (rank 0), 64 (rank 1)"`` for each setting whose values differ, joined by ``"; "``."""
    present = {owner: configuration for owner, configuration in configurations.items() if configuration is not None}
    keys = dict.fromkeys(key for configuration in present.values() for key in configuration)
    parts = []
    for key in keys:
        values = {owner: configuration.get(key, "(absent)") for owner, configuration in present.items()}
        if len(set(values.values())) > 1:
            parts.append(f"{key} is " + ", ".join(f"{value} ({owner})" for owner, value in values.items()))
    return "; ".join(parts)
