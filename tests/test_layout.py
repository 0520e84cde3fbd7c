"""The package's rooms and what each may import (the README's "Layout" section): imports only go down, the
measurement floors know nothing of Lightning, W&B or drawing, and ``import pl_pmse`` loads torch only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pl_pmse"

# room -> (its modules, the rooms of pl_pmse it may import besides itself); listed bottom up
ROOMS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "versions": (("versions",), ()),
    "checks": (("checks",), ("versions",)),
    "arithmetic": (("exact", "precision", "reduction", "distributed"), ("versions", "checks")),
    "spaces": (("spaces",), ("versions", "checks", "arithmetic")),
    "metrics": (
        ("functional", "exact_metric", "metric", "profile", "fidelity", "mcd"),
        ("versions", "checks", "arithmetic", "spaces"),
    ),
    "panels": (("panels",), ("versions",)),
    "sinks": (("sinks",), ("versions", "panels")),
    "callback": (
        ("callback", "lightning_compat"),
        ("versions", "checks", "arithmetic", "spaces", "metrics", "panels", "sinks"),
    ),
}
MEASUREMENT_ROOMS = ("versions", "checks", "arithmetic", "spaces", "metrics")
NOT_IN_MEASUREMENT = ("lightning", "pytorch_lightning", "lightning_utilities", "wandb", "PIL", "matplotlib",
                      "soundfile")  # fmt: skip


def room_of(module: str) -> str:
    top = module.split(".")[0]
    return next(room for room, (modules, _) in ROOMS.items() if top in modules)


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """``(module, is_pl_pmse)`` of every import in a file (inside functions too), relative ones resolved."""
    package = path.relative_to(PACKAGE.parent).parts[:-1]  # the package a relative import starts from
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, alias.name.split(".")[0] == "pl_pmse") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join((*base, *(node.module.split(".") if node.module else ())))
                names = [name] if node.module else [f"{name}.{alias.name}" for alias in node.names]
                found += [(n, True) for n in names]
            else:
                found.append((node.module, node.module.split(".")[0] == "pl_pmse"))
    return found


FILES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down_only(path: Path) -> None:
    room = room_of(".".join(path.relative_to(PACKAGE).with_suffix("").parts))
    allowed = {room, *ROOMS[room][1]}
    for module, ours in imports_of(path):
        if ours:
            inside = module.split(".", 1)[1] if "." in module else ""
            assert inside and room_of(inside) in allowed, f"{path.name} ({room}) imports {module}"
        elif room in MEASUREMENT_ROOMS:
            assert module.split(".")[0] not in NOT_IN_MEASUREMENT, f"{path.name} ({room}) imports {module}"


def test_import_pl_pmse_loads_torch_only() -> None:
    """``import pl_pmse`` costs about 0.1 s beyond torch (BENCHMARKS.md, imports); before, 2.7 s of torchvision,
    torchaudio, torchmetrics, scipy and matplotlib."""
    heavy = ("torchvision", "torchaudio", "torchmetrics", "lightning", "pytorch_lightning", "wandb", "matplotlib",
             "scipy", "PIL")  # fmt: skip
    code = ("import sys, pl_pmse; pl_pmse.perception_mse; print(pl_pmse.available_spaces()); "
            f"print([m for m in {heavy!r} if m in sys.modules])")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    spaces, loaded = done.stdout.splitlines()
    assert "vgg16" in spaces and "mel" in spaces and loaded == "[]"
