"""Mix: which sample fills each slot of each global batch, a pure function of (seed, mix, sizes, batch number).

Two deterministic pieces:
- a weighted round-robin over tasks (largest deficit first) whose counts stay within 1 of
  weight x n after every prefix of n steps, instead of independent random draws;
- per task, an endless stream of epochs, each a fresh seeded order: shards shuffled, then the
  samples of each window of `shuffle_window` consecutive shards shuffled together.

Nothing here reads data, so any batch can be located directly (resume reads nothing it skips).
A resume under another global batch continues from a `start` sample or per-task draw `origins`
(see Schedule.resized and docs/training.md).
"""

from __future__ import annotations

import numpy as np


class WeightedRoundRobin:
    """Task of step n (0-based) and how many steps that task had before it; random access by replay."""

    def __init__(self, weights):
        w = np.asarray(weights, dtype=np.float64)
        self.weights = w / w.sum()
        self._reset()

    def _reset(self):
        self._n = 0
        self._counts = np.zeros(len(self.weights), dtype=np.int64)
        self._last = None

    def at(self, n: int) -> tuple[int, int]:
        """(task, its count before step n). Forward access is O(1) per step; going back replays from 0."""
        if n < self._n - 1:
            self._reset()
        while self._n <= n:
            # after this step, the task whose count lags its share the most gets it (lowest index on ties)
            task = int(np.argmax(self.weights * (self._n + 1) - self._counts))
            self._last = (task, int(self._counts[task]))
            self._counts[task] += 1
            self._n += 1
        return self._last

    def counts(self, n: int) -> np.ndarray:
        """How many of steps [0, n) each task had."""
        if n == 0:
            return np.zeros(len(self.weights), dtype=np.int64)
        self.at(n - 1)
        return self._counts.copy()


class TaskStream:
    """Draw number -> row of one task: epoch after epoch, each in its own seeded order."""

    def __init__(self, shard_starts, shard_sizes, *, seed: int, task: int, window: int, epoch_len: int):
        self.starts, self.sizes = np.asarray(shard_starts), np.asarray(shard_sizes)
        self.seed, self.task, self.window, self.epoch_len = seed, task, window, epoch_len
        self._epoch = self._window = None

    def _rng(self, *keys) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.task, *keys])

    def row(self, draw: int) -> tuple[int, int]:
        """(epoch, row index) of the task's draw-th sample."""
        epoch, pos = divmod(draw, self.epoch_len)
        if epoch != self._epoch:
            order = self._rng(epoch).permutation(len(self.sizes))
            groups = [order[i : i + self.window] for i in range(0, len(order), self.window)]
            sizes = np.array([self.sizes[g].sum() for g in groups])
            self._epoch, self._groups, self._window = epoch, groups, None
            self._bounds = np.concatenate([[0], np.cumsum(sizes)])
        w = int(np.searchsorted(self._bounds, pos, side="right") - 1)
        if w != self._window:
            rows = np.concatenate([np.arange(self.starts[s], self.starts[s] + self.sizes[s]) for s in self._groups[w]])
            self._rows, self._window = rows[self._rng(epoch, w).permutation(len(rows))], w
        return epoch, int(self._rows[pos - self._bounds[w]])


class Schedule:
    """Global batch b -> its slots as (task, draw); rank r takes slots [r*B, (r+1)*B).

    `start` (sample mode): the sample of the endless mixed stream that batch 0 begins at.
    `origins` (batch mode): per task, the draw its batches begin at. Both are 0 for a fresh run and
    set by `resized` when a run resumes under another global batch.
    """

    def __init__(self, task_sizes: list[int], weights: list[float] | None, *, global_batch: int, mode: str,
                 start: int = 0, origins: list[int] | None = None):
        self.task_sizes, self.weights, self.global_batch, self.mode = task_sizes, weights, global_batch, mode
        unit = global_batch if mode == "batch" else 1
        # batch mode drops each task's last partial global batch per epoch, as the reference does
        self.epoch_lens = [n - n % unit for n in task_sizes]
        self.rr = WeightedRoundRobin(self.epoch_lens if weights is None else weights)
        self.batches_per_epoch = sum(self.epoch_lens) // global_batch
        self.start = start
        self.origins = list(origins) if origins is not None else [0] * len(task_sizes)

    def slots(self, b: int) -> list[tuple[int, int]]:
        G, o = self.global_batch, self.origins
        if self.mode == "batch":
            task, count = self.rr.at(b)
            return [(task, o[task] + count * G + j) for j in range(G)]
        return [(t, o[t] + c) for t, c in (self.rr.at(self.start + s) for s in range(b * G, (b + 1) * G))]

    def next_draws(self, b: int) -> list[int]:
        """Per task, the draw that comes next once batches [0, b) are done."""
        if self.mode == "batch":
            return [o + int(c) * self.global_batch for o, c in zip(self.origins, self.rr.counts(b))]
        return [o + int(c) for o, c in zip(self.origins, self.rr.counts(self.start + b * self.global_batch))]

    def resized(self, done: int, global_batch: int) -> "Schedule":
        """The schedule that carries on after `done` batches of this one with another global batch.

        Sample mode: the mixed sample stream does not depend on the global batch, so the new schedule
        starts at the next sample of it, exactly. Batch mode: each task carries on at the same position
        of the same epoch order; a position past the new epoch length (the new dropped tail, n mod G)
        moves to the next epoch; which task each global batch comes from restarts its round robin.
        """
        if self.mode == "sample":
            return Schedule(self.task_sizes, self.weights, global_batch=global_batch, mode=self.mode,
                            start=self.start + done * self.global_batch, origins=self.origins)
        new = Schedule(self.task_sizes, self.weights, global_batch=global_batch, mode=self.mode)
        for t, draw in enumerate(self.next_draws(done)):
            epoch, pos = divmod(draw, self.epoch_lens[t])
            if pos >= new.epoch_lens[t]:
                epoch, pos = epoch + 1, 0
            new.origins[t] = epoch * new.epoch_lens[t] + pos
        return new

    def epochs_started(self, b: int) -> list[tuple[int, int]]:
        """(task, epoch) pairs whose first draw falls in global batch b: a task running out and repeating."""
        return [(t, d // self.epoch_lens[t]) for t, d in self.slots(b) if d % self.epoch_lens[t] == 0 and d > 0]
