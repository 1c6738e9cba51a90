"""Training the study's independent runs, one after the other or in worker processes.

On a CPU, small models use cores poorly: a run with 2 threads is far from twice as fast as with 1, and a busy
neighbour stalls a multi-threaded run at every synchronisation. ``workers`` processes of ``cpu_count // workers``
threads each train several runs at once instead. Each run seeds itself and is saved to disk by whoever trained
it, so results do not depend on which process ran them (beyond the floating-point order of different thread
counts) and an interrupted study keeps every finished run.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch

from .runs import RunContext, RunSpec, RunStore, load_run, train_and_save

__all__ = ["RunExecutor", "default_workers"]

_WORKER: dict[str, Any] = {}


def default_workers(use_cpu: bool) -> int:
    """Two runs at a time on a CPU with at least 2 cores (one on a GPU: it is shared by the runs anyway)."""
    return min(2, os.cpu_count() or 1) if use_cpu else 1


def _init_worker(context: RunContext, folder: str, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER.update(context=context, folder=Path(folder))


def _train_in_worker(spec: RunSpec, key: str) -> str:
    train_and_save(spec, key, _WORKER["context"], _WORKER["folder"])
    return key


class RunExecutor:
    """``fetch(specs)``: the record of every spec, training the ones not on disk yet (``workers`` at a time).

    ``trained``: how many runs this executor has trained (the others it returned were read back from disk)."""

    def __init__(self, context: RunContext, folder: Path, *, workers: int = 1, progress: Any = None):
        self.context, self.folder, self.workers, self.progress = context, Path(folder), max(1, workers), progress
        self._pool: ProcessPoolExecutor | None = None
        self._store = RunStore(self.folder, context.key)
        self.trained = 0

    def __enter__(self) -> RunExecutor:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def _advance(self, spec: RunSpec) -> None:
        self.trained += 1
        if self.progress is not None:
            if self.progress.total is not None and self.progress.n >= self.progress.total:
                self.progress.total = self.progress.n + 1  # a grid was extended beyond the plan
            self.progress.set_postfix_str(spec.label.split(": ", 1)[-1][:60])
            self.progress.update(1)

    def fetch(self, specs: list[RunSpec]) -> list[dict[str, Any]]:
        keys = [self._store.key(spec) for spec in specs]
        records: dict[str, dict[str, Any] | None] = {}
        todo: dict[str, RunSpec] = {}
        for spec, key in zip(specs, keys):
            if key not in records:
                records[key] = load_run(self.folder, key)
            if records[key] is None:
                todo.setdefault(key, spec)  # equivalent specs share a key: the first one asked for is trained
        if self.workers == 1 or len(todo) <= 1:
            for key, spec in todo.items():
                train_and_save(spec, key, self.context, self.folder)
                self._advance(spec)
        else:
            self._run_in_pool(todo)
        for key in todo:  # trained just now, by this process or a worker: read what was saved
            records[key] = load_run(self.folder, key)
        return [records[key] for key in keys]

    def _run_in_pool(self, todo: dict[str, RunSpec]) -> None:
        if self._pool is None:
            threads = max(1, (os.cpu_count() or 1) // self.workers)
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker, initargs=(self.context, str(self.folder), threads),
            )
        futures = {self._pool.submit(_train_in_worker, spec, key): spec for key, spec in todo.items()}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                spec = futures[future]
                try:
                    future.result()
                except Exception as error:
                    for other in pending:
                        other.cancel()
                    raise RuntimeError(f"Study run {spec.label!r} failed: {error}") from error
                self._advance(spec)
