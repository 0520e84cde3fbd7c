"""Exactness across 2 real gloo processes: uneven batches, empty ranks, one collective per compute."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torchmetrics import MeanSquaredError

from pl_pmse import PerceptionMSE

COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_object",
    "all_gather_into_tensor",
    "broadcast",
    "barrier",
    "reduce",
    "gather",
    "scatter",
    "reduce_scatter",
    "all_to_all",
)


def dataset(seed: int = 0, shape: tuple[int, ...] = (3, 12, 12), low: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    make = lambda: torch.rand(23, *shape, generator=generator) * (1 - low) + low  # noqa: E731
    return make(), make()


# Each split gives the batches of rank 0 and rank 1 as (start, stop) slices of the dataset.
SPLITS = {
    "uneven": ([(0, 2), (2, 7), (7, 8), (8, 20)], [(20, 23)]),
    "rank 1 sees nothing": ([(0, 23)], []),
    "rank 0 sees nothing": ([], [(0, 4), (4, 23)]),
    "interleaved": ([(0, 1), (5, 9), (20, 23)], [(1, 5), (9, 20)]),
}


class CollectiveCounter:
    """Counts calls of every torch.distributed collective while active."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._originals: dict = {}

    def __enter__(self) -> CollectiveCounter:
        for name in COLLECTIVES:
            original = getattr(dist, name)
            self._originals[name] = original

            def counted(*args, _name=name, _original=original, **kwargs):
                self.calls.append(_name)
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)


def exactness_task(rank: int, world_size: int, space: str, options: dict, shape: tuple, low: float) -> dict:
    preds, target = dataset(shape=shape, low=low)
    single = PerceptionMSE(space, data_range=(low, 1.0), sync_on_compute=False, **options)
    single.update(preds, target)  # one process on all the data, computed in this worker's own thread setup
    results = {"single process": (single.compute_summary(), [])}
    for name, per_rank in SPLITS.items():
        metric = PerceptionMSE(space, data_range=(low, 1.0), **options)
        for start, stop in per_rank[rank]:
            metric.update(preds[start:stop], target[start:stop])
        metric.check_configuration()
        with CollectiveCounter() as counter:
            summary = metric.compute_summary()
        results[name] = (summary, counter.calls)
    return results


@pytest.mark.parametrize(
    ("space", "shape", "low"),
    [("pixel", (3, 12, 12), 0.0), ("squeezenet", (3, 20, 20), 0.0), ("mel", (2, 1200), -1.0)],
)
def test_exact_across_ranks_for_every_split(ddp, backbone_weights, space: str, shape: tuple, low: float) -> None:
    """Every split, every rank: the same bits as one process on all the data, for every component.

    A convolution network may round its features differently for different batch sizes (oneDNN picks its
    algorithm by shape; here with one thread per process), so for a backbone the per-sample values, not the
    aggregation, can differ at float32 rounding level between splits; ranks still agree bit for bit.
    """
    options = {"squeezenet": {"weights": backbone_weights["squeezenet"]}, "mel": {"sample_rate": 8000}}.get(space, {})
    ranks = ddp.run(exactness_task, space, options, shape, low)
    expected, _ = ranks[0].pop("single process")
    assert torch.equal(ranks[1].pop("single process")[0]["total"], expected["total"])
    assert len(expected) == 3 + len(PerceptionMSE(space, **options).space.component_names)
    for rank_results in ranks:
        for name, (summary, calls) in rank_results.items():
            assert calls == ["all_reduce"], (name, calls)
            for key, value in expected.items():
                assert torch.equal(summary[key], ranks[0][name][0][key]), (name, key)  # ranks agree bit for bit
                if space == "squeezenet":
                    torch.testing.assert_close(summary[key], value, rtol=1e-6, atol=0)
                else:
                    assert torch.equal(summary[key], value), (name, key, summary[key], value)


def counting_task(rank: int, world_size: int) -> dict:
    preds, target = dataset()
    ours, theirs = PerceptionMSE(), MeanSquaredError()
    if rank == 0:
        ours.update(preds, target)
        theirs.update(preds, target)
    counts = {}
    for label, call in (
        ("first compute", ours.compute),
        ("compute", ours.compute),
        ("components", ours.compute_components),
        ("torchmetrics MSE", theirs.compute),
    ):
        ours._computed = None  # no cached value: every call syncs
        with CollectiveCounter() as counter:
            call()
        counts[label] = counter.calls
    return counts


def test_one_collective_per_compute(ddp) -> None:
    for counts in ddp.run(counting_task):
        assert counts["first compute"] == ["all_reduce", "all_reduce"]  # one-time configuration check + state
        assert counts["compute"] == ["all_reduce"]
        assert counts["components"] == ["all_reduce"]
        assert len(counts["torchmetrics MSE"]) > 1  # barrier + all_gathers per state
        print("collectives per compute: pl-pmse", counts["compute"], "torchmetrics", counts["torchmetrics MSE"])


def mismatch_task(rank: int, world_size: int, options: tuple[dict, dict]) -> str:
    metric = PerceptionMSE(**options[rank])
    audio = metric.space.modality == "audio"
    metric.update(*(torch.rand(2, 4096) - 0.5 if audio else torch.rand(2, 4) for _ in range(2)))
    try:
        metric.compute()
    except RuntimeError as error:
        # the state stays local and usable after the failed sync
        assert metric.totals[-2].item() == 2
        return str(error)
    return "no error"


MEL = {"space": "mel", "sample_rate": 16000}
MISMATCHES = [  # (rank 0's options, rank 1's options, what the error must name)
    ({"data_range": 1.0}, {"data_range": 255.0}, "data_range is (0.0, 1.0) (rank 0), (0.0, 255.0) (rank 1)"),
    ({"space": "pixel"}, {"space": "waveform"}, "space is pixel (PixelSpace) (rank 0), waveform"),
    ({"space": "waveform"}, {"space": "mrstft", "fft_sizes": (4,)}, "state size is"),  # gloo would abort
    ({**MEL, "hop_length": 256}, {**MEL, "hop_length": 64}, "hop_length is 256 (rank 0), 64 (rank 1)"),
    ({**MEL, "eps": 1e-5}, {**MEL, "eps": 1.0}, "eps is 1e-05 (rank 0), 1.0 (rank 1)"),
    (
        {"space": "mrstft"},
        {"space": "mrstft", "hop_sizes": (64, 128, 256)},
        "hop_sizes is (128, 256, 512) (rank 0), (64",
    ),
    ({"component_weights": {"pixel": 1.0}}, {"component_weights": {"pixel": 2.0}}, "component_weights is"),
    ({"nan_strategy": "error"}, {"nan_strategy": "warn"}, "nan_strategy is error (rank 0), warn (rank 1)"),
]


def test_configuration_mismatch_is_reported_naming_the_setting(ddp) -> None:
    for *options, named in MISMATCHES:
        for message in ddp.run(mismatch_task, tuple(options)):
            assert "differs between processes" in message and named in message, message


def sampler_task(rank: int, world_size: int, size: int, batch_size: int) -> list[float]:
    """The metric alone (as with Fabric or plain torch.distributed): sample_mask leaves the padding repeats out."""
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from pl_pmse.distributed import sample_mask

    generator = torch.Generator().manual_seed(5)
    data = TensorDataset(torch.rand(size, 3, 8, 8, generator=generator), torch.rand(size, 3, 8, 8, generator=generator))
    sampler = DistributedSampler(data, shuffle=True, seed=3)  # the repeats are the last samples, whatever the shuffle
    metric, seen = PerceptionMSE(data_range=1.0), 0
    for preds, target in DataLoader(data, batch_size=batch_size, sampler=sampler):
        metric.update(preds, target, mask=sample_mask(sampler, seen, len(preds)))
        seen += len(preds)
    return [value.item() for value in metric.compute_summary().values()]


@pytest.mark.parametrize(("size", "batch_size"), [(7, 2), (9, 4), (3, 4)])
def test_sample_mask_gives_the_whole_set_value_with_the_metric_alone(ddp, size: int, batch_size: int) -> None:
    generator = torch.Generator().manual_seed(5)
    preds, target = torch.rand(size, 3, 8, 8, generator=generator), torch.rand(size, 3, 8, 8, generator=generator)
    single = PerceptionMSE(data_range=1.0)
    single.update(preds, target)
    expected = [value.item() for value in single.compute_summary().values()]
    assert ddp.run(sampler_task, size, batch_size) == [expected, expected]


def unknown_sampler_task(rank: int, world_size: int) -> list[str]:
    import warnings
    from types import SimpleNamespace

    from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

    from pl_pmse.callback import PerceptionMSECallback

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(range(4))

    callback = PerceptionMSECallback("pixel")
    module = SimpleNamespace(device=torch.device("cpu"))
    known = DataLoader(range(7), sampler=DistributedSampler(range(7)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback._start(None, "validate", [known], module)
        callback._start(None, "validate", [known, DataLoader(range(5)), DataLoader(Stream())], module)
        callback._start(None, "validate", [known, DataLoader(range(5)), DataLoader(Stream())], module)
    return [str(w.message) for w in caught]


def test_an_unknown_sampler_under_ddp_warns_once_on_rank_zero(ddp) -> None:
    zero, one = ddp.run(unknown_sampler_task)
    assert one == []  # the callback warns as Lightning does: on global rank zero only
    (message,) = zero
    assert "validate dataloader(s) [1, 2] have no DistributedSampler" in message and "counts every" in message


def float_state_task(rank: int, world_size: int) -> str:
    metric = PerceptionMSE(data_range=1.0)
    metric.update(torch.rand(2, 4), torch.rand(2, 4))
    if rank == 1:
        metric.totals = metric.totals.double()  # what no update, load or merge can produce any more
    try:
        metric.compute()
    except RuntimeError as error:
        return str(error)
    return "no error"


def test_a_float_state_on_one_rank_raises_on_every_rank(ddp) -> None:
    for message in ddp.run(float_state_task):
        assert "state dtype is torch.int64 (rank 0), torch.float64 (rank 1)" in message, message


class _SentBytes:
    """Counts the bytes this rank hands to ``all_gather`` (its own tensor) and to ``send``."""

    def __enter__(self) -> _SentBytes:
        self.bytes, self.calls = 0, {name: getattr(dist, name) for name in ("all_gather", "send")}
        dist.all_gather = lambda tensors, tensor, *a, **kw: self._count(tensor, "all_gather", tensors, tensor, *a, **kw)
        dist.send = lambda tensor, *a, **kw: self._count(tensor, "send", tensor, *a, **kw)
        return self

    def _count(self, tensor: torch.Tensor, name: str, *args, **kwargs):
        self.bytes += tensor.numel() * tensor.element_size()
        return self.calls[name](*args, **kwargs)

    def __exit__(self, *exc: object) -> None:
        for name, call in self.calls.items():
            setattr(dist, name, call)


def worst_k_task(rank: int, world_size: int, k: int) -> dict[int, tuple[int, int, list[float]]]:
    """Each rank keeps its k worst of 6 samples (two 3x64x64 float32 tensors each, 96 KiB); the gather runs in
    worlds of 2 and 3 ranks (subgroups of the pool). Per world: the bytes this rank hands to collectives and sends,
    the bytes of its chosen samples, and the values rank zero receives (worst first)."""
    import pickle

    from pl_pmse.callback.selection import Sample, WorstSamples

    results = {}
    for size in (2, 3):
        group = dist.new_group(list(range(size)))  # every rank takes part in making each group
        if rank >= size:
            continue
        worst = WorstSamples(k)
        generator = torch.Generator().manual_seed(100 + rank)
        for row in range(6):
            value = float(torch.rand((), generator=generator))
            position = row * size + rank
            if worst.wants(value, position):
                tensors = torch.rand(2, 3, 64, 64, generator=generator)
                worst.add(Sample(value, -position, f"r{rank}s{row}", {}, tensors[0], tensors[1]))
        with _SentBytes() as sent:
            gathered = worst.gathered(group=group)
        every = [None] * size
        dist.all_gather_object(every, [(s.value, s.earlier, s.label) for s in worst.heap], group=group)  # the check
        chosen = sorted((entry for part in every for entry in part), reverse=True)[:k]
        mine = sorted((s for s in worst.heap if s.label in {label for *_, label in chosen}), reverse=True)
        results[size] = (sent.bytes, len(pickle.dumps(mine)) if mine else 0, [s.value for s in gathered], chosen)
    return results


def test_the_worst_k_gather_sends_the_chosen_samples_once_whatever_the_world_size(ddp3) -> None:
    k = 4
    results = ddp3.run(worst_k_task, k)
    for size in (2, 3):
        chosen = results[0][size][3]
        assert results[0][size][2] == [value for value, *_ in chosen]  # rank zero gets the true k worst
        assert all(results[rank][size][2] == [] for rank in range(1, size))
        for rank in range(size):
            sent, own_chosen, *_ = results[rank][size]
            # 16 bytes per score, and a rank that holds chosen samples sends them once (their size first)
            assert sent == 16 * k + (8 + own_chosen if rank and own_chosen else 0), (rank, size, sent, own_chosen)
    assert any(results[rank][size][1] for size in (2, 3) for rank in range(1, size))  # samples did travel
    # what a rank sends is bounded by k scores and its chosen samples: the same bound for 2 and 3 ranks
    bound = 16 * k + 8 + k * (2 * 3 * 64 * 64 * 4 + 1024)
    assert all(results[rank][size][0] <= bound for size in (2, 3) for rank in range(size))


def test_a_process_group_initialised_again_is_checked_again(tmp_path, monkeypatch) -> None:
    """The cross-rank configuration check runs once per metric and process group: a default group destroyed and
    initialised again (another world, perhaps) is a new group and is checked again."""
    import pl_pmse.exact_metric as exact_metric

    checked = []
    monkeypatch.setattr(exact_metric, "check_same_everywhere", lambda *args, **kwargs: checked.append(args[2]))
    metric = PerceptionMSE()
    try:
        for attempt in ("first", "second"):
            dist.init_process_group("gloo", init_method=f"file://{tmp_path / attempt}", rank=0, world_size=1)
            metric._check_same_configuration(None)
            metric._check_same_configuration(None)  # the same group: checked once
            dist.destroy_process_group()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert len(checked) == 2
