"""Run functions on W local gloo processes (tests, benchmarks).

- ``spawn(fn, W, *args)``: start W processes, run ``fn(rank, W, *args)`` in each, wait, stop them.
- ``GlooWorld(W)``: W processes started once that run one submitted function after another
  (``world.run(fn, *args)``); importing torch costs seconds of CPU per process, so a test module keeps
  one world per size instead of spawning per test.

Each process gets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT in its environment (as under
torchrun), an initialised gloo process group (collectives time out after ``timeout_s``) and ``threads``
CPU threads. ``fn`` must be importable by name (a module-level function). A failure on any rank raises
in the caller with that rank's traceback.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import traceback
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world_size: int, port: int, threads: int, timeout_s: float) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))


def _worker(rank: int, world_size: int, port: int, threads: int, fn: Callable, args: tuple) -> None:
    _init(rank, world_size, port, threads, 300)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, world_size: int, *args, threads: int = 1) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo processes and wait for all of them."""
    mp.spawn(_worker, args=(world_size, free_port(), threads, fn, args), nprocs=world_size, join=True)


def _serve(rank: int, world_size: int, port: int, threads: int, timeout_s: float, tasks, results) -> None:
    _init(rank, world_size, port, threads, timeout_s)
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args = task
        try:
            fn(rank, world_size, *args)
            results.put((rank, None))
        except BaseException:  # noqa: BLE001 - report everything to the caller
            results.put((rank, traceback.format_exc()))
    os._exit(0)  # skip interpreter teardown (seconds of CPU per process); nothing is left to flush


class GlooWorld:
    """W persistent gloo processes; ``run(fn, *args)`` calls ``fn(rank, W, *args)`` on all of them."""

    def __init__(self, world_size: int, *, threads: int = 1, timeout_s: float = 120.0):
        ctx = mp.get_context("spawn")
        self.world_size, self.timeout_s = world_size, timeout_s
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._results = ctx.Queue()
        port = free_port()
        self._procs = [ctx.Process(target=_serve, args=(r, world_size, port, threads, timeout_s, self._tasks[r],
                                                        self._results), daemon=True) for r in range(world_size)]
        for p in self._procs:
            p.start()
        self.alive = True

    def run(self, fn: Callable, *args, timeout_s: float | None = None) -> None:
        if not self.alive:
            raise RuntimeError("this GlooWorld was closed after a failure; create a new one")
        for q in self._tasks:
            q.put((fn, args))
        errors = []
        for _ in range(self.world_size):
            try:
                rank, err = self._results.get(timeout=timeout_s or 2 * self.timeout_s + 60)
            except queue.Empty:
                self.close()
                raise RuntimeError(f"{fn.__name__}: no answer from every rank (hung collective?)") from None
            if err is not None:
                errors.append((rank, err))
        if errors:
            self.close()  # a failed collective leaves the group unusable
            rank, err = min(errors)
            raise RuntimeError(f"{fn.__name__} failed on rank {rank} (of {len(errors)} failing):\n{err}")

    def close(self) -> None:
        if not self.alive:
            return
        self.alive = False
        for q, p in zip(self._tasks, self._procs):
            if p.is_alive():
                q.put(None)
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        for q in self._tasks + [self._results]:
            q.close()
            q.join_thread()
