"""PerceptionMSE inside torchmetrics' collections and wrappers, as users combine metrics."""

from __future__ import annotations

import pytest
import torch
from torchmetrics import MeanSquaredError, MetricCollection, MetricTracker
from torchmetrics.wrappers import BootStrapper, FeatureShare, MinMaxMetric, MultitaskWrapper, Running

from pl_pmse import PerceptionMSE

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def batches(count: int = 3, shape: tuple[int, ...] = (4, 3, 16, 16)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.rand(shape, generator=generator), torch.rand(shape, generator=generator)) for _ in range(count)]


def test_compute_groups_share_a_state_only_between_metrics_built_alike() -> None:
    """Before: equal states after the first update put a strict and a lenient metric in one compute group, and the
    strict one never raised on NaN (only the group's first member is updated)."""
    collection = MetricCollection({"strict": PerceptionMSE("pixel"), "same": PerceptionMSE("pixel"),
                                   "lenient": PerceptionMSE("pixel", nan_strategy="ignore")})  # fmt: skip
    preds, target = batches(1)[0]
    collection.update(preds, target)
    assert sorted(map(sorted, collection.compute_groups.values())) == [["lenient"], ["same", "strict"]]
    poisoned = preds.clone()
    poisoned[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"preds: contains NaN or Inf in samples \[0\]"):
        collection.update(poisoned, target)


def test_the_configuration_checksum_is_never_saved_and_merges_keep_working() -> None:
    metric = PerceptionMSE("pixel")
    metric.persistent(True)
    assert set(metric.state_dict()) == {"totals", "configuration"}
    for preds, target in batches(2):
        metric.update(preds, target)
    merged = PerceptionMSE("pixel")
    merged.merge_state({"totals": metric.totals.clone()})
    assert torch.equal(merged.totals, metric.totals)


def test_wrappers_take_perception_mse() -> None:
    data = batches()
    reference = [PerceptionMSE("pixel") for _ in data]
    for metric, (preds, target) in zip(reference, data, strict=True):
        metric.update(preds, target)
    values = torch.stack([metric.compute() for metric in reference])

    tracker = MetricTracker(PerceptionMSE("pixel"), maximize=False)
    for preds, target in data:
        tracker.increment()
        tracker.update(preds, target)
    best, step = tracker.best_metric(return_step=True)
    assert torch.equal(tracker.compute_all(), values) and step == int(values.argmin()) and best == values.min()

    running = Running(PerceptionMSE("pixel"), window=2)
    for preds, target in data:
        running.update(preds, target)
    last_two = PerceptionMSE("pixel")
    for preds, target in data[1:]:
        last_two.update(preds, target)
    assert running.compute() == last_two.compute()

    minmax = MinMaxMetric(PerceptionMSE("pixel"))
    for preds, target in data:
        minmax.update(preds, target)
        minmax.compute()
    assert minmax.compute()["raw"] == PerceptionMSE("pixel").forward(torch.cat([p for p, _ in data]),
                                                                     torch.cat([t for _, t in data]))  # fmt: skip

    tasks = MultitaskWrapper({"images": PerceptionMSE("pyramid", data_range=1.0), "plain": MeanSquaredError()})
    images = batches(1, (2, 3, 32, 32))[0]
    tasks.update({"images": images[0], "plain": data[0][0]}, {"images": images[1], "plain": data[0][1]})
    single = PerceptionMSE("pyramid", data_range=1.0)
    single.update(*images)
    assert tasks.compute()["images"] == single.compute()


def test_bootstrapper_with_its_usual_float32_quantile_and_float64_results() -> None:
    """Before: compute() returned float64 and ``quantile=torch.tensor([0.05, 0.95])`` crashed ("q tensor must be
    same dtype"); results now follow torch's default dtype, float64 through set_dtype."""
    data = batches()
    for metric, quantile in ((PerceptionMSE("pixel"), torch.tensor([0.05, 0.95])),
                             (PerceptionMSE("pixel").set_dtype(torch.float64),
                              torch.tensor([0.05, 0.95], dtype=torch.float64))):  # fmt: skip
        bootstrap = BootStrapper(metric, num_bootstraps=8, quantile=quantile)
        for preds, target in data:
            bootstrap.update(preds, target)
        result = bootstrap.compute()
        assert result["quantile"].dtype == quantile.dtype
        assert result["quantile"][0] <= result["mean"] <= result["quantile"][1]


def test_feature_share_refuses_perception_mse_and_one_metric_shares_the_forward() -> None:
    """FeatureShare caches a network's final output per input; a feature space reads inner layers (README)."""
    with pytest.raises(AttributeError, match="feature_network"):
        FeatureShare({"deep": PerceptionMSE("vgg16", weights="random"),
                      "shallow": PerceptionMSE("vgg16", weights="random", layers=["relu1_2"])})  # fmt: skip
    preds, target = batches(1, (2, 3, 32, 32))[0]
    both = PerceptionMSE("vgg16", weights="random", layers=["relu1_2", "relu3_3"])
    both.update(preds, target)
    for layer in ("relu1_2", "relu3_3"):
        alone = PerceptionMSE("vgg16", weights="random", layers=[layer])
        alone.update(preds, target)
        assert both.compute_components()[layer] == alone.compute_components()[layer]
