"""What the tests need of torch beyond what pl-pmse needs, with their skip marks: the oldest torch allowed (2.4, run
by ``make test-floors``) has neither.

- ``FakeTensorMode`` with CUDA tensors on a machine without a GPU: torch 2.14 runs it; torch 2.4 initialises the
  CUDA driver when a CPU tensor is moved to them and fails.
- ``torch.compile(..., fullgraph=True)`` of the loss: traced without a graph break on torch 2.14 (CI's); torch 2.4's
  compiler cannot trace ``dataclasses.replace``, so it breaks the graph there (``fullgraph=False`` runs).
"""

from __future__ import annotations

import pytest
import torch

from pl_pmse.versions import release


def _why_not() -> str | None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            torch.ones(2, device="cuda") + torch.ones(2).to("cuda")  # made there, and moved there (a metric's .to)
    except Exception as error:  # the torch's own reason, whatever its type
        return f"{type(error).__name__}: {str(error).splitlines()[0]}"
    return None


WHY_NOT = None if torch.cuda.is_available() else _why_not()
REASON = f"torch {torch.__version__} cannot run FakeTensorMode with CUDA tensors without a GPU ({WHY_NOT})"
needs_fake_cuda = pytest.mark.skipif(WHY_NOT is not None, reason=REASON)

FULLGRAPH_TESTED = (2, 14)
needs_fullgraph_compile = pytest.mark.skipif(
    release(torch.__version__) < FULLGRAPH_TESTED,
    reason=f"torch.compile(fullgraph=True) of the loss is tested on torch >= 2.14 (found {torch.__version__})",
)
