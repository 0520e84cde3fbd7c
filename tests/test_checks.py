"""The bad-input matrix: every rejected call names the argument, says what was expected, changes nothing."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torchmetrics import Metric

from pl_pmse import PerceptionMSE, perception_mse


def image(n: int = 2, *shape: int) -> torch.Tensor:
    return torch.rand(n, *(shape or (3, 8, 8)))


def with_value(x: torch.Tensor, value: float, index: tuple = (1, 0, 0, 0)) -> torch.Tensor:
    x = x.clone()
    x[index] = value
    return x


# (id, metric options, preds, target, error type, message pattern)
UPDATE_CASES = [
    ("preds not a tensor", {}, [[0.0, 1.0]], image(), TypeError, r"preds: expected a torch.Tensor, got list"),
    ("target not a tensor", {}, image(), 3.0, TypeError, r"target: expected a torch.Tensor, got float"),
    ("shape mismatch", {}, image(2), image(3), ValueError, r"expected the same shape, got \(2, 3, 8, 8\) and \(3"),
    ("0-dim", {}, torch.tensor(1.0), torch.tensor(1.0), ValueError, r"preds: expected a batch \[N, ...\]"),
    ("bool", {}, image() > 0.5, image() > 0.5, TypeError, r"preds: expected a real floating point or integer"),
    (
        "complex",
        {},
        torch.ones(2, 3, dtype=torch.complex64),
        torch.ones(2, 3, dtype=torch.complex64),
        TypeError,
        r"preds: expected a real floating point",
    ),
    (
        "integer without data_range",
        {},
        torch.ones(2, 3, dtype=torch.uint8),
        torch.ones(2, 3, dtype=torch.uint8),
        TypeError,
        r"preds: integer input \(torch.uint8\) needs an explicit data_range",
    ),
    (
        "integer target without data_range",
        {},
        image(),
        torch.ones(2, 3, 8, 8, dtype=torch.int16),
        TypeError,
        r"target: integer input \(torch.int16\) needs an explicit data_range",
    ),
    (
        "NaN in preds",
        {},
        with_value(image(), float("nan")),
        image(),
        ValueError,
        r"preds: contains NaN or Inf in samples \[1\]; .*nan_strategy='ignore' or 'warn'",
    ),
    (
        "Inf in target",
        {},
        image(),
        with_value(image(), float("inf"), (0, 2, 7, 7)),
        ValueError,
        r"target: contains NaN or Inf in samples \[0\]",
    ),
    (
        "NaN in both",
        {},
        with_value(image(), float("nan")),
        with_value(image(), float("-inf")),
        ValueError,
        r"preds and target: contains NaN or Inf in samples \[1\]",
    ),
    (
        "overflow",
        {},
        image() * 1e30,
        -image() * 1e30,
        ValueError,
        r"overflows float32 \(\|values\| up to [0-9.e+]+\): pass float64 inputs",
    ),
    (
        "overflow in float64",
        {},
        image().double() * 1e200,
        -image().double() * 1e200,
        ValueError,
        r"overflows float64 \(\|values\| up to [0-9.e+]+\): scale the inputs",
    ),
    (
        "mixed dtype kinds",
        {"data_range": 1.0},
        image(),
        (image() * 255).to(torch.uint8),
        TypeError,
        r"preds and target: expected the same dtype kind .* got torch.float32 and torch.uint8",
    ),
    (
        "different devices",
        {},
        image(),
        image().to("meta"),
        ValueError,
        r"preds and target: expected the same device, got cpu and meta",
    ),
    ("empty samples", {}, torch.zeros(2, 0), torch.zeros(2, 0), ValueError, r"every sample needs at least one"),
    (
        "audio rank",
        {"space": "waveform"},
        image(),
        image(),
        ValueError,
        r"space 'waveform' expects audio \[N, T\] or \[N, C, T\], got shape \(2, 3, 8, 8\)",
    ),
    ("audio 1-d", {"space": "waveform"}, torch.rand(5), torch.rand(5), ValueError, r"expects audio \[N, T\]"),
]


@pytest.mark.parametrize(
    ("options", "preds", "target", "error", "pattern"),
    [case[1:] for case in UPDATE_CASES],
    ids=[case[0] for case in UPDATE_CASES],
)
def test_rejected_update_leaves_state_unchanged(options, preds, target, error, pattern) -> None:
    metric = PerceptionMSE(**options)
    good = torch.rand(2, 3, 8, 8) if options.get("space") != "waveform" else torch.rand(2, 100)
    metric.update(good, good * 0.5)
    before, count = metric.totals.clone(), metric.update_count
    with pytest.raises(error, match=pattern):
        metric.update(preds, target)
    with pytest.raises(error, match=pattern):
        metric(preds, target)  # forward takes the same checks
    assert torch.equal(metric.totals, before) and metric.update_count == count
    with pytest.raises(error, match=pattern):
        perception_mse(preds, target, **options)


CONSTRUCTOR_CASES = [
    (
        "unknown space",
        {"space": "vgg91"},
        ValueError,
        r"space: expected one of \[.*'pixel'.*\], a Space or an nn.Module, got 'vgg91'",
    ),
    ("space of wrong type", {"space": 3}, ValueError, r"space: expected one of"),
    (
        "unknown space option",
        {"space": "pixel", "layers": ["a"]},
        TypeError,
        r"space 'pixel': unknown option\(s\) \['layers'\]; it accepts \['component_weights'\]",
    ),
    (
        "bad nan_strategy",
        {"nan_strategy": "skip"},
        ValueError,
        r"nan_strategy: expected one of 'error', 'ignore', 'warn', got 'skip'",
    ),
    ("negative data_range", {"data_range": -1.0}, ValueError, r"data_range: expected finite bounds with max > min"),
    ("reversed data_range", {"data_range": (1, 0)}, ValueError, r"data_range: expected finite bounds"),
    ("string data_range", {"data_range": "255"}, TypeError, r"data_range: expected None, a positive number"),
    (
        "unknown weight",
        {"component_weights": {"relu1_2": 1.0}},
        ValueError,
        r"component_weights: unknown component 'relu1_2'; the components are \['pixel'\]",
    ),
    (
        "negative weight",
        {"component_weights": {"pixel": -1}},
        ValueError,
        r"component_weights\['pixel'\]: expected a finite number >= 0",
    ),
    ("NaN weight", {"component_weights": {"pixel": float("nan")}}, ValueError, r"component_weights\['pixel'\]"),
    ("weights not a mapping", {"component_weights": [1.0]}, TypeError, r"component_weights: expected a mapping"),
    (
        "options with a Space object",
        {"space": PerceptionMSE().space, "component_weights": {}},
        ValueError,
        r"space options \['component_weights'\] only apply when space is given by name",
    ),
    ("unknown torchmetrics option", {"compute_on_cpu": "yes"}, ValueError, r"compute_on_cpu"),
]


@pytest.mark.parametrize(
    ("options", "error", "pattern"),
    [case[1:] for case in CONSTRUCTOR_CASES],
    ids=[case[0] for case in CONSTRUCTOR_CASES],
)
def test_bad_constructor_arguments(options, error, pattern) -> None:
    with pytest.raises(error, match=pattern):
        PerceptionMSE(**options)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"reduction": "avg"}, r"reduction: expected one of 'mean', 'sum', 'none', got 'avg'"),
        ({"nan_strategy": None}, r"nan_strategy: expected one of"),
    ],
)
def test_bad_functional_arguments(kwargs, pattern) -> None:
    with pytest.raises(ValueError, match=pattern):
        perception_mse(image(), image(), **kwargs)


@pytest.mark.parametrize("strategy", ["warn", "ignore"])
def test_nan_strategies_skip_and_count(strategy: str) -> None:
    metric = PerceptionMSE(nan_strategy=strategy)
    preds, target = image(4), image(4)
    poisoned = with_value(preds, float("nan"), (2, 1, 1, 1))
    if strategy == "warn":
        with pytest.warns(UserWarning, match=r"preds: contains NaN or Inf in samples \[2\]; these samples are skipped"):
            metric.update(poisoned, target)
    else:
        metric.update(poisoned, target)
    clean = PerceptionMSE()
    clean.update(preds[[0, 1, 3]], target[[0, 1, 3]])
    summary = metric.compute_summary()
    assert torch.equal(summary["total"], clean.compute()) and summary["skipped"].item() == 1


def test_every_sample_skipped_gives_nan_with_a_warning() -> None:
    metric = PerceptionMSE(nan_strategy="ignore")
    metric.update(torch.full((2, 3), float("nan")), torch.zeros(2, 3))
    with pytest.warns(UserWarning, match="every sample skipped"):
        assert metric.compute().isnan()


@pytest.mark.parametrize("space", ["pyramid", "aspects", "mel"])
def test_predictions_outside_the_range_are_measured_and_warned_once_targets_are_checked(space: str) -> None:
    """A model overshoots its range (1.6 for [0, 1], 1e6 times the span too): measured, one warning naming the
    fraction and extent; a target outside the range is a wrong data_range: refused naming target, state unchanged."""

    audio = space == "mel"
    options = {"sample_rate": 16000} if audio else {"data_range": 1.0}
    target = torch.rand(2, 8000) * 2 - 1 if audio else torch.rand(2, 3, 64, 64)
    preds = target.clone()
    preds.view(-1)[:5] = 1.6
    preds.view(-1)[-3:] = 2e6
    metric = PerceptionMSE(space, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metric.update(preds, target)
        metric.update(preds, target)
    messages = [str(w.message) for w in caught if "predicted values" in str(w.message)]
    bounds = r"\[-1, 1\]" if audio else r"\[0, 1\]"
    assert len(messages) == 1 and re.search(
        rf"of the predicted values lie outside {bounds} \(found \[.*, 2e\+06\]\)", messages[0]
    )
    unchecked = PerceptionMSE(space, validate_args=False, **options)
    unchecked.update(preds, target)
    unchecked.update(preds, target)
    assert torch.isfinite(metric.compute()) and torch.equal(metric.compute(), unchecked.compute())
    before = metric.totals.clone()
    with pytest.raises(ValueError, match=rf"target: space '{space}' expects values in {bounds} .*found target values"):
        metric.update(target, target * 255)
    assert torch.equal(metric.totals, before) and metric.update_count == 2


def test_a_rejected_batch_leaves_the_padding_bookkeeping_as_it_was() -> None:
    """Under ExactEvaluation an update takes its rows from the batch's position in the rank's pass; a batch that is
    refused must not take any (else the next one would be cut as if it were padding)."""
    from pl_pmse import ErrorProfile
    from pl_pmse.exact_metric import Padding

    for metric, bad in (
        (PerceptionMSE("pyramid", data_range=1.0), (torch.rand(3, 3, 32, 32), torch.rand(3, 3, 32, 32) * 255)),
        (PerceptionMSE("pixel"), (torch.rand(3, 3, 8, 8), torch.rand(3, 3, 8, 9))),
        (ErrorProfile("image", 1.0), (torch.rand(3, 3, 32, 32), torch.rand(3, 3, 32, 32)[:, :2])),
    ):
        padding = Padding(own=4)  # this rank's own samples: 4; what follows is the sampler's padding
        metric.__dict__.update(_padding=padding, _padding_rows=0)
        with pytest.raises((ValueError, TypeError)):
            metric.update(*bad)
        assert metric.__dict__["_padding_rows"] == 0 and padding.rows == 0, type(metric).__name__
        good = torch.rand(3, 3, 32, 32)
        metric.update(good, good.clone())  # all 3 rows are the rank's own: none cut
        assert metric.__dict__["_padding_rows"] == 3


@pytest.mark.parametrize("name", ["PerceptionMSE", "ImageFidelity", "ErrorProfile", "MelCepstralDistortion"])
def test_a_parent_moving_a_metric_to_the_meta_device_is_refused_and_the_state_kept(name: str) -> None:
    """Lightning and users move metrics through their parent module (``nn.Module._apply``), not ``metric.to``."""
    import pl_pmse

    options = {"ErrorProfile": ("image", 1.0), "MelCepstralDistortion": (16000,)}.get(name, ())
    metric = getattr(pl_pmse, name)(*options)
    holder = torch.nn.ModuleDict({"m": metric})
    before = metric.totals.clone()
    with pytest.raises(ValueError, match=rf"{name}\.to: the meta device holds no values"):
        holder.to("meta")
    with pytest.raises(ValueError, match=rf"{name}\.to: the meta device holds no values"):
        metric.to(torch.device("meta"))
    assert metric.totals.device.type == "cpu" and torch.equal(metric.totals, before)


@pytest.mark.parametrize(
    ("mine", "theirs", "data"),
    [
        ("pixel", {"data_range": 255}, (torch.full((1, 3, 4, 4), 200.0), torch.zeros(1, 3, 4, 4))),
        ("mel", {"sample_rate": 16000, "hop_length": 128}, (torch.rand(1, 4000) - 0.5, torch.rand(1, 4000) - 0.5)),
        ("ImageFidelity", {"data_range": 255.0}, (torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16))),
    ],
    ids=["pixel data_range", "mel hop_length", "ImageFidelity data_range"],
)
def test_merging_the_metric_state_dict_of_another_configuration_is_refused(mine, theirs, data) -> None:
    """``merge_state(other.metric_state)`` (torchmetrics' dict form) checks the configuration as ``merge_state(other)``
    does: a data_range=255 state merged into a data_range=1 metric gave 40000.0."""
    from pl_pmse import ImageFidelity

    def build(options: dict) -> Metric:
        if mine == "ImageFidelity":
            return ImageFidelity(**options)
        defaults = {"sample_rate": 16000} if mine == "mel" else {"data_range": 1.0}
        return PerceptionMSE(mine, **{**defaults, **options})

    receiver, other = build({}), build(theirs)
    other.update(*data)
    before = {key: value.clone() for key, value in receiver.metric_state.items()}
    with pytest.raises(ValueError, match=r"merge_state: the state comes from another configuration"):
        receiver.merge_state(other.metric_state)
    assert all(torch.equal(receiver.metric_state[key], value) for key, value in before.items())
    alike = build({})
    alike.update(*data)
    receiver.merge_state(alike.metric_state)  # the same configuration merges
    assert torch.equal(receiver.totals, alike.totals)


def test_merging_states_whose_sum_overflows_int64_is_refused_and_changes_nothing() -> None:
    """Two tampered states of 2**62 per bin wrapped to negative entries on merging and compute gave inf."""
    receiver, other = PerceptionMSE(), PerceptionMSE()
    tampered = torch.full_like(receiver.totals, 2**62)
    receiver.load_state_dict({"totals": tampered.clone()}, strict=False)
    other.load_state_dict({"totals": tampered.clone()}, strict=False)
    for incoming in (other, other.metric_state):
        with pytest.raises(ValueError, match=r"merge_state: the sum would overflow the int64 accumulators"):
            receiver.merge_state(incoming)
        assert torch.equal(receiver.totals, tampered)


def test_network_weights_with_nan_are_named_as_the_cause(backbone_weights) -> None:
    """NaN weights (a diverged fine-tune, a corrupt file) were reported as 'check the inputs' scale'."""
    metric = PerceptionMSE("squeezenet", weights=backbone_weights["squeezenet"])
    with torch.no_grad():
        metric.space.tensors()[3].view(-1)[0] = float("nan")
    images = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"space 'squeezenet': 1 of its \d+ weight tensors hold NaN or Inf"):
        metric.update(images, images.flip(-1))
    assert metric.update_count == 0 and not metric.totals.any()


def test_exact_evaluation_warns_when_a_metric_takes_more_rows_than_the_batch_holds() -> None:
    """A module that updates its metric twice per validation batch (a flipped second pass) gave 0.034 on 1 process
    and 0.023 on 2 without a word: the rows taken beyond the batch are detected."""
    from pl_pmse import ExactEvaluation
    from pl_pmse.exact_metric import Padding

    callback, metric = ExactEvaluation(), PerceptionMSE("pixel")
    callback._passes, callback._metrics = {0: Padding(own=5)}, [metric]
    images = torch.rand(4, 3, 8, 8)
    for twice in (False, True):
        callback._mark(None, 0)
        metric.update(images, images.flip(-1))
        if twice:
            metric.update(images.flip(-1), images)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            callback._advance(None, (images, images), 0)
        warned = [str(w.message) for w in caught if "ExactEvaluation: a metric was updated with" in str(w.message)]
        if twice:
            assert len(warned) == 1 and "updated with 8 rows in a batch of 4" in warned[0]
        else:
            assert warned == []
