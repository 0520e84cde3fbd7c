"""Shared fixtures: a reusable 2-process gloo pool, offline W&B in a temp dir, deterministic seeds."""

from __future__ import annotations

import os

import pytest
import torch

from tests.distributed import DistributedPool

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_CODE", "true")


LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "PL_GLOBAL_SEED",
                    "PL_SEED_WORKERS")  # fmt: skip


@pytest.fixture(autouse=True)
def _seed_and_clean_launch_variables():
    """Seed torch; undo the launch variables a Lightning run leaves behind (W&B's own stay: its service runs on)."""
    torch.manual_seed(0)
    saved = {name: os.environ.get(name) for name in LAUNCH_VARIABLES}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def _pools() -> dict:
    holder: dict = {}
    yield holder
    for pool in holder.values():
        pool.close()


def _pool(pools: dict, world_size: int) -> DistributedPool:
    """The session's pool of ``world_size`` processes, started on first use and restarted after a failed task."""
    pool = pools.get(world_size)
    if pool is None or pool.broken:
        if pool is not None:
            pool.close()
        pool = pools[world_size] = DistributedPool(world_size=world_size)
    return pool


@pytest.fixture
def ddp(_pools: dict) -> DistributedPool:
    """Two real processes on gloo."""
    return _pool(_pools, 2)


@pytest.fixture
def ddp3(_pools: dict) -> DistributedPool:
    """Three real processes on gloo (subgroups of them play smaller worlds)."""
    return _pool(_pools, 3)


@pytest.fixture(scope="session")
def backbone_weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Random torchvision weights saved once per session, loaded through the real ``weights=<path>`` code."""
    from pl_pmse.spaces.backbones import ARCHITECTURES, load_backbone

    folder = tmp_path_factory.mktemp("weights")
    paths = {}
    for index, architecture in enumerate(ARCHITECTURES):
        torch.manual_seed(index)
        path = folder / f"{architecture}.pth"
        torch.save(load_backbone(architecture, "random").state_dict(), path)
        paths[architecture] = str(path)
    return paths
