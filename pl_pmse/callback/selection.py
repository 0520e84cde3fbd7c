"""Which samples the panels show: the same fixed samples every epoch, and the worst k gathered across ranks."""

from __future__ import annotations

import heapq
import math
import pickle
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from lightning_utilities.core.rank_zero import rank_zero_warn

from ..distributed import collective_device, receive_bytes, send_bytes
from ..functional import SampleStats
from ..panels.sets import Sample


def candidates(stats: SampleStats, weights: Mapping[str, float]) -> list[tuple[int, float, dict[str, float]]]:
    """``(row, Perception MSE, component MSEs)`` of the valid samples of a batch (one read of the batch's sums, then
    plain float64 arithmetic: the values :meth:`SampleStats.total` gives, without a dozen tiny tensor operations)."""
    found = []
    for row, (ok, sums) in enumerate(zip(stats.valid.tolist(), stats.sums.tolist(), strict=True)):
        if ok:
            mse = {name: value / size for name, value, size in zip(stats.names, sums, stats.sizes, strict=True)}
            found.append((row, sum(weights[name] * value for name, value in mse.items()), mse))
    return found


class FixedSamples:
    """Positions ``(batch, row)`` of the samples shown every epoch: the first ``count`` of the first epoch, then
    kept (and saved in checkpoints, validated when restored)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.positions: list[tuple[int, int]] = []
        self.frozen = False

    def offer(self, batch_idx: int, row: int) -> bool:
        """Whether the sample at ``(batch_idx, row)`` is a fixed one (choosing it while the choice is open)."""
        if not self.frozen and len(self.positions) < self.count:
            self.positions.append((batch_idx, row))
        return (batch_idx, row) in self.positions

    def end_epoch(self, found: int) -> None:
        """Freeze the choice; restored positions this set does not have (a smaller set, another batch size) warn
        and are chosen afresh from the next epoch on, instead of silently drawing fewer."""
        if self.frozen and found < len(self.positions):
            rank_zero_warn(
                f"PerceptionMSECallback: {len(self.positions) - found} of the {len(self.positions)} fixed panel "
                f"samples restored from the checkpoint ({self.positions}) are not in this validation set; the fixed "
                f"samples are chosen afresh from the next epoch on",
                category=UserWarning,
                stacklevel=5,
            )
            self.positions, self.frozen = [], False
            return
        self.frozen = self.frozen or bool(self.positions)

    def state_dict(self) -> dict[str, Any]:
        return {"fixed_positions": [list(p) for p in self.positions], "fixed_frozen": self.frozen}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        positions, frozen = state.get("fixed_positions", []), state.get("fixed_frozen")
        valid = isinstance(positions, (list, tuple)) and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(type(v) is int and v >= 0 for v in p)
            for p in positions
        )
        if not valid or not isinstance(frozen, (bool, type(None))):
            rank_zero_warn(
                f"PerceptionMSECallback: the checkpoint's fixed panel samples are not valid (fixed_positions="
                f"{positions!r}, fixed_frozen={frozen!r}); the fixed samples are chosen afresh",
                category=UserWarning,
                stacklevel=5,
            )
            positions, frozen = [], False
        if len(positions) > self.count:  # saved with a larger num_panel_samples: the first ones, as many as drawn now
            rank_zero_warn(
                f"PerceptionMSECallback: the checkpoint holds {len(positions)} fixed panel samples, "
                f"num_panel_samples={self.count}: the first {self.count} are kept",
                category=UserWarning,
                stacklevel=5,
            )
            positions = positions[: self.count]
        self.positions = [tuple(p) for p in positions]
        self.frozen = bool(self.positions) if frozen is None else frozen


class WorstSamples:
    """The ``k`` samples with the highest Perception MSE seen on this rank (a min-heap of CPU copies)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.heap: list[Sample] = []

    def wants(self, value: float, position: int) -> bool:
        """Whether a sample of this value and position would be kept (only those are copied to the CPU)."""
        return bool(self.k) and (
            len(self.heap) < self.k or (value, -position) > (self.heap[0].value, self.heap[0].earlier)
        )

    def add(self, sample: Sample) -> None:
        (heapq.heappush if len(self.heap) < self.k else heapq.heapreplace)(self.heap, sample)

    def gathered(self, device: torch.device | str | None = None, group: Any = None) -> list[Sample]:
        """The ``k`` worst across all ranks, worst first, on the group's rank zero (``[]`` elsewhere): a collective.

        Sized by the result, in two phases: every rank's ``k`` scores ``(value, -position)`` are gathered (16 bytes
        each), every rank picks the same ``k`` from them, and only the chosen samples travel, each once, to rank
        zero (point to point); tensors on ``device`` for NCCL (:func:`~pl_pmse.distributed.collective_device`)."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1):
            return sorted(self.heap, reverse=True)[: self.k]
        rank, device = dist.get_rank(group), collective_device(device, group)
        padding = [(-math.inf, 0.0)] * (self.k - len(self.heap))  # every rank sends k rows
        scores = torch.tensor([(s.value, s.earlier) for s in self.heap] + padding, dtype=torch.float64)
        everyone = [torch.empty_like(scores, device=device) for _ in range(dist.get_world_size(group))]
        dist.all_gather(everyone, scores.to(device), group=group)
        ranked = sorted(
            ((value, earlier, source, index) for source, part in enumerate(everyone)
             for index, (value, earlier) in enumerate(part.tolist()) if value > -math.inf),
            reverse=True,
        )[: self.k]  # fmt: skip
        chosen: dict[int, list[int]] = {}
        for _, _, source, index in ranked:
            chosen.setdefault(source, []).append(index)
        if rank:
            if rank in chosen:
                send_bytes(pickle.dumps([self.heap[i] for i in chosen[rank]]), 0, device, group)
            return []
        samples = [self.heap[i] for i in chosen.get(0, [])]
        for source in sorted(chosen.keys() - {0}):
            samples += pickle.loads(receive_bytes(source, device, group))  # this job's own ranks
        return sorted(samples, reverse=True)
