"""Loader: one rank's batches of the mix, built in DataLoader workers, with an exact state_dict."""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .collate import collate
from .config import MixConfig
from .decode import FrameDecodeError, augment, decode_jpeg
from .schedule import Schedule, TaskStream
from .shards import TASK_IDS, CorruptSample, SampleReader, TaskData, load_task

log = logging.getLogger(__name__)
STATE_VERSION = 2  # 1: before elastic resume (still read)
MAX_REPLACEMENTS = 64  # with skip_corrupt: how far to look for a readable sample before giving up


class MixPlan:
    """Everything a worker needs to build batch b of one rank; cheap to fork, holds no open files."""

    def __init__(self, mix: MixConfig, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
        self.mix, self.rank, self.world_size = mix, rank, world_size
        self.tasks: list[TaskData] = [load_task(t.name, t.shards, t.split, t.sources, mix.max_tokens) for t in mix.tasks]
        for t in self.tasks:
            if t.too_long:
                log.warning("task %s: %d samples longer than max_tokens=%d are left out", t.name, t.too_long,
                            mix.max_tokens)
        fingerprints = {json.dumps(t.tokenizer, sort_keys=True) for t in self.tasks}
        if len(fingerprints) != 1:
            raise ValueError("the mix's task folders were tokenised with different tokenizers: "
                             + ", ".join(f"{t.name}={t.tokenizer.get('fingerprint', '?')[:12]}" for t in self.tasks))
        for t in self.tasks:
            if t.image_size != mix.image_size:
                raise ValueError(f"task {t.name!r} was sharded at image size {t.image_size}, the mix expects "
                                 f"{mix.image_size} (image_size in the mix config)")
        manip = [t.task_id == TASK_IDS["manip"] for t in self.tasks]
        if any(manip) and not all(manip):
            raise ValueError("manipulation task folders cannot be mixed with text tasks in one mix (the VLA model "
                             "trains on actions, the others on tokens): " + ", ".join(t.name for t in self.tasks))
        self.pad_id = self.tasks[0].tokenizer["pad_token_id"]
        global_batch = mix.batch_size * world_size
        weights = None if mix.tasks[0].weight is None else [t.weight for t in mix.tasks]
        self.schedule = Schedule([len(t) for t in self.tasks], weights, global_batch=global_batch, mode=mix.mix)
        for t, n in zip(self.tasks, self.schedule.epoch_lens):
            if n == 0:
                raise ValueError(f"task {t.name!r} has {len(t)} samples, fewer than one "
                                 f"{'global batch' if mix.mix == 'batch' else 'sample'} ({global_batch})")
        self.streams = [TaskStream(t.shard_starts, t.shard_sizes, seed=mix.seed, task=i, window=mix.shuffle_window,
                                   epoch_len=n) for i, (t, n) in enumerate(zip(self.tasks, self.schedule.epoch_lens))]
        self.augment = [mix.augment if m.augment is None else m.augment for m in mix.tasks]
        self.task_fingerprints = [t.fingerprint for t in self.tasks]
        self.fingerprint = hashlib.sha256(json.dumps(self.task_fingerprints).encode()).hexdigest()

    def rank_slots(self, b: int) -> list[tuple[int, int]]:
        B = self.mix.batch_size
        return self.schedule.slots(b)[self.rank * B : (self.rank + 1) * B]

    def load_sample(self, reader: SampleReader, task: int, draw: int) -> dict:
        data = self.tasks[task]
        epoch, row = self.streams[task].row(draw)
        key = str(data.keys[row])
        path = data.shard_paths[data.shard[row]]
        sample = reader.read(path, int(data.offset[row]), int(data.size[row]), key)
        rng = np.random.default_rng([self.mix.seed, task, draw]) if self.augment[task] else None
        frames = []
        for jpg in sample["frames"]:
            try:
                img = decode_jpeg(jpg, self.mix.image_size)
            except FrameDecodeError as e:
                raise CorruptSample(f"{path}: sample {key}: {e}") from None
            frames.append(augment(img, rng) if rng is not None else img)
        meta = sample["meta"]
        out = {"input_ids": sample["input_ids"], "labels": sample["labels"], "frames": frames,
               "time_ids": meta.get("time_ids", []), "n_history": meta.get("n_history", 0),
               "task_id": data.task_id, "mix_id": task, "key": key}
        if "actions" in sample:  # manipulation: the action chunks, their mask, the span's task
            out.update(actions=sample["actions"], action_mask=sample["action_mask"].astype(bool),
                       manip_task=meta.get("manip_task", ""))
        return out

    def build_batch(self, reader: SampleReader, b: int) -> dict:
        samples, skipped = [], []
        for task, draw in self.rank_slots(b):
            for attempt in range(MAX_REPLACEMENTS + 1):
                try:
                    samples.append(self.load_sample(reader, task, draw + attempt))
                    break
                except CorruptSample as e:
                    if not self.mix.skip_corrupt:
                        raise
                    # the next sample of the same task takes its slot, so this rank's batch keeps its size
                    skipped.append(str(e))
                    log.warning("skipping corrupt sample (batch %d, rank %d): %s", b, self.rank, e)
            else:
                raise CorruptSample(f"{MAX_REPLACEMENTS} corrupt samples in a row in task {self.tasks[task].name!r}")
        batch = collate(samples, pad_id=self.pad_id, max_tokens=self.mix.max_tokens, image_size=self.mix.image_size,
                        uint8=self.mix.uint8_images)
        batch["skipped"] = skipped
        if self.mix.pack_tokens:  # the model packs (it alone knows a sample's length with its frames spliced in)
            batch["pack_tokens"] = self.mix.pack_tokens
        return batch


class _RankBatches(IterableDataset):
    """Batches [start, stop) of one rank; DataLoader worker w of W builds start + w, start + w + W, ..."""

    def __init__(self, plan: MixPlan, start: int, stop: int | None):
        self.plan, self.start, self.stop = plan, start, stop

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        reader = SampleReader()
        b = self.start + worker
        try:
            while self.stop is None or b < self.stop:
                yield self.plan.build_batch(reader, b)
                b += workers
        finally:
            reader.close()


class ShardLoader:
    """Iterable of one rank's batches with `state_dict()` / `load_state_dict()` for exact resume.

    Every rank walks the same global batch numbers and takes its own slice of each, so all ranks
    yield the same number of batches; the order does not depend on the number of workers.
    """

    def __init__(self, mix: MixConfig, *, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 pin_memory: bool = False, prefetch_factor: int = 2):
        self.plan = MixPlan(mix, rank, world_size)
        self.num_workers, self.pin_memory, self.prefetch_factor = num_workers, pin_memory, prefetch_factor
        self.batches = 0  # batches this rank has yielded: the whole of the resumable state
        self.skipped = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.plan.schedule.batches_per_epoch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self):
        stop = None
        if self.plan.mix.finite:
            stop = (self.batches // self.batches_per_epoch + 1) * self.batches_per_epoch
        dataset = _RankBatches(self.plan, self.batches, stop)
        extra = {"prefetch_factor": self.prefetch_factor} if self.num_workers else {}
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory, **extra)
        for batch in loader:
            for task, epoch in self.plan.schedule.epochs_started(self.batches):
                log.info("task %s ran out: starting its epoch %d in a fresh order", self.plan.tasks[task].name, epoch)
            self.batches += 1
            self.skipped += len(batch["skipped"])
            yield batch

    def state_dict(self) -> dict:
        sched = self.plan.schedule
        return {"version": STATE_VERSION, "world_size": self.plan.world_size, "batch_size": self.plan.mix.batch_size,
                "global_batch": sched.global_batch, "start": sched.start, "origins": sched.origins,
                "mix": self.plan.mix.order_fields(), "data": self.plan.fingerprint,
                "batches": self.batches, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        """Continue after the state's batches, on any number of ranks.

        The same global batch (batch_size x world_size) continues the global sample stream exactly;
        another one continues each task where it stopped (Schedule.resized). Refuses a state from
        another mix (seed, tasks, weights, mix mode, shuffle window), other shards or an unknown version.
        """
        version = state.get("version")
        if version not in (1, STATE_VERSION):
            raise ValueError(f"loader state version {version} cannot be read (this is {STATE_VERSION})")
        mine, theirs = self.plan.mix.order_fields(), state["mix"]
        changed = sorted(k for k in mine if k != "batch_size" and mine[k] != theirs.get(k))
        if changed:
            raise ValueError(f"loader state was saved with a different mix ({', '.join(changed)} changed)")
        if version == 1:  # no offsets yet, and its data fingerprint hashed the mix fields too
            v1 = hashlib.sha256(json.dumps([theirs, self.plan.task_fingerprints], sort_keys=True).encode()).hexdigest()
            state = {**state, "data": self.plan.fingerprint if v1 == state["data"] else None, "start": 0,
                     "global_batch": theirs["batch_size"] * state["world_size"], "origins": [0] * len(self.plan.tasks)}
        if state["data"] != self.plan.fingerprint:
            raise ValueError("loader state was saved over different shards (manifest sha256s differ)")
        sched = self.plan.schedule
        saved = Schedule(sched.task_sizes, sched.weights, global_batch=state["global_batch"], mode=sched.mode,
                         start=state["start"], origins=state["origins"])
        self.skipped = int(state["skipped"])
        if saved.global_batch == sched.global_batch:
            self.plan.schedule, self.batches = saved, int(state["batches"])
            return
        self.plan.schedule, self.batches = saved.resized(int(state["batches"]), sched.global_batch), 0
        log.info("resuming with global batch %d (saved with %d): each task continues at draw %s",
                 sched.global_batch, saved.global_batch, self.plan.schedule.next_draws(0))


def label_token_ids(plan: MixPlan) -> list[int]:
    """Every token id any training sample of the mix has as a label (reads each sample's members once, not the
    frames it references): what a restricted output vocabulary (`output_vocab: labels`) must hold."""
    ids: set[int] = set()
    reader = SampleReader()
    try:
        for data in plan.tasks:
            for row in range(len(data)):
                sample = reader.read(data.shard_paths[data.shard[row]], int(data.offset[row]), int(data.size[row]),
                                     str(data.keys[row]), frames=False)
                labels = np.asarray(sample["labels"])
                ids.update(int(t) for t in np.unique(labels[labels >= 0]))
    finally:
        reader.close()
    return sorted(ids)


def build_loader(mix: MixConfig, *, rank: int = 0, world_size: int = 1, num_workers: int = 0, **kwargs) -> ShardLoader:
    """The batches of `rank` out of `world_size` for this mix; see ShardLoader."""
    return ShardLoader(mix, rank=rank, world_size=world_size, num_workers=num_workers, **kwargs)
