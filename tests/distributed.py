"""A pool of real worker processes joined in a gloo process group, shared by the whole test session.

Starting processes and importing torch costs seconds, so the pool starts once; each test sends it a
module-level function (pickled by reference) that every rank runs, and gets one result per rank back.
A short process-group timeout makes a hang fail fast instead of stalling the suite.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

PROCESS_GROUP_TIMEOUT_S = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, tasks: Any, results: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=PROCESS_GROUP_TIMEOUT_S)
    )
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args = task
        try:
            results.put((rank, True, fn(rank, world_size, *args)))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class DistributedPool:
    """``pool.run(fn, *args)`` runs ``fn(rank, world_size, *args)`` on every rank; returns results by rank."""

    def __init__(self, world_size: int = 2) -> None:
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.broken = False
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        port = free_port()
        self.processes = [
            ctx.Process(target=_worker, args=(rank, world_size, port, self.tasks[rank], self.results), daemon=True)
            for rank in range(world_size)
        ]
        for process in self.processes:
            process.start()

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 120) -> list[Any]:
        for task_queue in self.tasks:
            task_queue.put((fn, args))
        outcomes: dict[int, tuple[bool, Any]] = {}
        for _ in range(self.world_size):
            try:
                rank, ok, value = self.results.get(timeout=timeout)
            except queue.Empty:
                self.broken = True
                raise TimeoutError(f"distributed task {fn.__name__} did not finish in {timeout} s") from None
            outcomes[rank] = (ok, value)
        failures = {rank: value for rank, (ok, value) in outcomes.items() if not ok}
        if failures:
            self.broken = True  # a failed rank may leave the group out of step: the next test gets a new pool
            raise RuntimeError(f"{fn.__name__} failed on ranks {sorted(failures)}:\n" + "\n".join(failures.values()))
        return [outcomes[rank][1] for rank in range(self.world_size)]

    def close(self) -> None:
        for task_queue in self.tasks:
            task_queue.put(None)
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()


def clean_environment() -> dict[str, str]:
    """The environment for a fresh process: no Lightning launch variables left by earlier in-process runs, and
    no WANDB_SERVICE (a child would log through this test process's W&B service instead of its own)."""
    dropped = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "WANDB_SERVICE")
    return {k: v for k, v in os.environ.items() if k not in dropped and not k.startswith("PL_")}
