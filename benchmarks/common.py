"""Helpers shared by the benchmarks (and the loss tests): interleaved timing, peak memory, saved-for-backward bytes,
the hand-written loss baseline, a table printer."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten operations that launch no kernel (views, metadata, allocation): left out of launch counts
NO_LAUNCH = frozenset({
    "view", "_unsafe_view", "reshape", "slice", "select", "expand", "permute", "transpose", "t", "squeeze",
    "unsqueeze", "split", "split_with_sizes", "chunk", "unbind", "unfold", "view_as_real", "as_strided", "alias",
    "detach", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "is_same_size", "lift_fresh",
    "_local_scalar_dense",
})  # fmt: skip


class LaunchCounter(TorchDispatchMode):
    """Counts the aten operations that would each launch a kernel on a GPU: every aten op but views and metadata,
    no ``prim`` op."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func.namespace == "aten" and func.overloadpacket.__name__ not in NO_LAUNCH:
            self.count += 1
        return func(*args, **(kwargs or {}))


def fake_cuda_launches(module: torch.nn.Module, shape: tuple[int, ...], call: Callable[..., object]) -> int:
    """Kernel launches of the second ``call(module, preds, target)`` on CUDA inputs of ``shape``, counted under torch's
    ``FakeTensorMode`` with ``device="cuda"`` (no GPU needed; forward code only). ``module`` is built beforehand on
    the CPU and moved there; it holds fake tensors afterwards."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True), torch.device("cuda"):
        moved = module.to("cuda")
        preds, target = torch.rand(shape), torch.rand(shape)
        call(moved, preds, target)
        with LaunchCounter() as counter:
            call(moved, preds, target)
    return counter.count


def interleaved(candidates: dict[str, Callable[[], object]], repeats: int = 15, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each candidate, timed in turns so that machine noise hits all alike."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak tensor memory that ``fn()`` adds to what is in use when it starts, as torch's allocator sees it: the CUDA
    allocator's peak on a GPU; on a CPU, the running sum of the allocations and frees the profiler records (the
    process's resident set would add the C allocator's fragmentation, which varies from run to run)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as recorded:
        fn()
    events = [e for e in recorded.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def hand_written_loss(space: Any, data_range: tuple[float, float] | None = None) -> Callable:
    """The loss as users write it by hand: target features under no_grad, one F.mse_loss per component (the
    reference of the loss benchmark and of tests/test_loss.py)."""
    import torch.nn.functional as F

    def loss(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weights = space.component_weights
        total = weights[space.raw_name] * F.mse_loss(preds, target)
        with torch.no_grad():
            constant = space.features(space.to_expected_range(target, data_range))
        for name, value in space.features(space.to_expected_range(preds, data_range)).items():
            total = total + weights[name] * F.mse_loss(value, constant[name])
        return total

    return loss


def saved_bytes(step: Callable[[], Any]) -> tuple[int, Any]:
    """Bytes held for backward during ``step()`` (each storage once, counted with saved_tensors_hooks), and its
    result."""
    storages: dict[tuple[int, int], int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = step()
    return sum(storages.values()), result


def machine() -> str:
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        cpuinfo = Path("/proc/cpuinfo")
        names = (
            [
                line.split(":", 1)[1].strip()
                for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")
            ]
            if cpuinfo.exists()
            else []
        )
        device = names[0] if names else platform.processor() or "cpu"
    return f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}, python {platform.python_version()}"


def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    """A Markdown table."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
