"""The shard loader: exact resume, weights, rank balance and coverage, determinism, safety, corrupt data."""

import json
import pickle
import tarfile
from collections import Counter
from itertools import islice

import numpy as np
import pytest
import torch

from conftest import episode, write_source
from pipeline.config import ConfigError, NavShardConfig
from pipeline.nav import run_nav
from streamvln.data import MixConfig, TaskMix, build_loader, load_mix
from streamvln.data.schedule import WeightedRoundRobin
from streamvln.data.shards import CorruptSample


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory, tokenizer_dir):
    """Two sources in one nav folder: A with 3 x 9 episodes' samples, B smaller; several small shards."""
    root = tmp_path_factory.mktemp("loader")
    a = write_source(root / "data", "A", [episode(i, 10 + 3 * i, ("Go left.", "Turn around.")) for i in range(9)])
    b = write_source(root / "data", "B", [episode(100 + i, 36) for i in range(5)])
    run_nav([a, b], root / "shards", NavShardConfig(image_size=32, samples_per_shard=5), tokenizer_dir, progress=False)
    return root / "shards" / "nav"


def mix_of(task_dir, **options):
    tasks = options.pop("tasks", None) or [TaskMix("a", [str(task_dir)], sources=["A"]),
                                           TaskMix("b", [str(task_dir)], sources=["B"])]
    return MixConfig(tasks=tasks, image_size=32, **options)


def take(loader, n):
    return list(islice(iter(loader), n))


def assert_same_batches(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x["keys"] == y["keys"]
        for k in ("input_ids", "labels", "attention_mask", "images", "time_ids", "task_ids", "n_history"):
            assert torch.equal(x[k], y[k]), k


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world_size", [1, 2])
def test_exact_mid_epoch_resume(shard_root, workers, world_size):
    mix = mix_of(shard_root, batch_size=2, augment=True, mix="sample")
    for rank in range(world_size):
        full = take(build_loader(mix, rank=rank, world_size=world_size, num_workers=workers), 14)
        for k, m in ((0, 3), (5, 4), (9, 5)):
            first = build_loader(mix, rank=rank, world_size=world_size, num_workers=workers)
            take(first, k)
            state = first.state_dict()
            assert state["batches"] == k
            resumed = build_loader(mix, rank=rank, world_size=world_size, num_workers=workers)
            resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
            assert_same_batches(take(resumed, m), full[k : k + m])


def test_order_does_not_depend_on_workers_and_is_deterministic(shard_root):
    mix = mix_of(shard_root, batch_size=3, augment=True)
    runs = [take(build_loader(mix, num_workers=w), 10) for w in (0, 0, 2, 3)]
    for other in runs[1:]:
        assert_same_batches(runs[0], other)
    reseeded = take(build_loader(mix_of(shard_root, batch_size=3, augment=True, seed=1)), 10)
    assert [b["keys"] for b in reseeded] != [b["keys"] for b in runs[0]]


def global_keys(mix, world_size, n, state=None):
    """Keys of n global batches (ranks' slices in rank order) and the rank-0 state after them."""
    loaders = [build_loader(mix, rank=r, world_size=world_size) for r in range(world_size)]
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(json.loads(json.dumps(state)))
    per_rank = [[b["keys"] for b in take(loader, n)] for loader in loaders]
    return [sum((keys[b] for keys in per_rank), []) for b in range(n)], loaders[0].state_dict()


@pytest.mark.parametrize("mode", ["batch", "sample"])
@pytest.mark.parametrize("before,after", [((2, 2), (1, 4)), ((1, 4), (2, 2)), ((2, 3), (3, 2))])
def test_same_global_batch_resumes_exactly_on_another_world_size(shard_root, mode, before, after):
    (w0, b0), (w1, b1) = before, after
    full, _ = global_keys(mix_of(shard_root, batch_size=b0, mix=mode), w0, 12)
    _, state = global_keys(mix_of(shard_root, batch_size=b0, mix=mode), w0, 5)
    resumed, _ = global_keys(mix_of(shard_root, batch_size=b1, mix=mode), w1, 7, state)
    assert resumed == full[5:]


def per_task(batches):
    return {src: [k for b in batches for k in b if k.startswith(src)] for src in "AB"}


@pytest.mark.parametrize("mode", ["batch", "sample"])
@pytest.mark.parametrize("before,after", [((2, 2), (3, 2)), ((2, 2), (1, 2)), ((1, 3), (2, 5))])
def test_another_global_batch_continues_each_task_without_repeats_or_gaps(shard_root, mode, before, after):
    (w0, b0), (w1, b1) = before, after
    g0, g1 = w0 * b0, w1 * b1
    sizes = dict(zip("AB", map(len, build_loader(mix_of(shard_root)).plan.tasks)))
    uninterrupted, _ = global_keys(mix_of(shard_root, batch_size=b0, mix=mode), w0, 40)
    first, state = global_keys(mix_of(shard_root, batch_size=b0, mix=mode), w0, 3)
    rest, _ = global_keys(mix_of(shard_root, batch_size=b1, mix=mode), w1, 40, state)
    if mode == "sample":  # the mixed sample stream does not depend on the global batch: it continues exactly
        flat, whole = [k for b in first + rest for k in b], [k for b in uninterrupted for k in b]
        m = min(len(flat), len(whole))
        assert m >= 80 and flat[:m] == whole[:m]
    before_t, after_t, full_t = per_task(first), per_task(rest), per_task(uninterrupted)
    for src, n in sizes.items():
        done = len(before_t[src])
        seq = before_t[src] + after_t[src]
        if done < n - n % g0 and done < n - n % g1:  # mid-epoch: the same epoch order carries on
            assert after_t[src][0] == full_t[src][done], src
        repeat = next(i for i, k in enumerate(seq) if k in seq[:i])  # the next epoch's first sample
        tail = max(n % g0, n % g1) if mode == "batch" else 0  # batch mode drops a partial global batch
        assert n - tail <= repeat <= n, (src, repeat, n)


def test_resume_refuses_another_mix_shards_or_version_and_reads_version_1(shard_root, tmp_path):
    mix = mix_of(shard_root)
    loader = build_loader(mix, world_size=2)
    take(loader, 2)
    state = loader.state_dict()
    with pytest.raises(ValueError, match=r"different mix \(seed changed\)"):
        build_loader(mix_of(shard_root, seed=7), world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"different mix \(mix changed\)"):
        build_loader(mix_of(shard_root, mix="sample")).load_state_dict(state)
    with pytest.raises(ValueError, match="different shards"):
        build_loader(mix, world_size=2).load_state_dict({**state, "data": "0" * 64})
    with pytest.raises(ValueError, match="version"):
        build_loader(mix, world_size=2).load_state_dict({**state, "version": 99})
    # a state written before elastic resume (version 1) still resumes
    import hashlib

    v1_data = hashlib.sha256(json.dumps([state["mix"], loader.plan.task_fingerprints], sort_keys=True).encode())
    v1 = {"version": 1, "world_size": 2, "rank": 0, "mix": state["mix"], "data": v1_data.hexdigest(), "batches": 2,
          "skipped": 0}
    again = build_loader(mix, world_size=2)
    again.load_state_dict(v1)
    assert_same_batches(take(again, 2), take(loader, 2))


@pytest.mark.parametrize("weights", [[1, 1], [3, 1], [0.7, 0.2, 0.1], [5, 3, 2, 1], [0.01, 0.99]])
def test_weighted_round_robin_counts_stay_within_one(weights):
    rr = WeightedRoundRobin(weights)
    share = np.array(weights) / sum(weights)
    counts = np.zeros(len(weights))
    for n in range(1, 2001):
        task, before = rr.at(n - 1)
        assert before == counts[task]
        counts[task] += 1
        assert np.all(np.abs(counts - share * n) < 1), (n, counts)
    assert rr.at(5) == WeightedRoundRobin(weights).at(5)  # random access replays the same sequence


@pytest.mark.parametrize("mode,weights", [("batch", (0.75, 0.25)), ("sample", (0.5, 0.5)), ("sample", (0.2, 0.8))])
def test_loader_task_shares_follow_the_weights(shard_root, mode, weights):
    tasks = [TaskMix("a", [str(shard_root)], sources=["A"], weight=weights[0]),
             TaskMix("b", [str(shard_root)], sources=["B"], weight=weights[1])]
    mix = mix_of(shard_root, tasks=tasks, batch_size=2, mix=mode)
    batches = take(build_loader(mix), 40)
    keys = [k for b in batches for k in b["keys"]]
    assert set(torch.cat([b["task_ids"] for b in batches]).tolist()) == {0}  # both are navigation (task id 0)
    mix_ids = torch.cat([b["mix_ids"] for b in batches]).tolist()  # the mix entry each sample came from
    assert all(k.startswith("A-") == (m == 0) for k, m in zip(keys, mix_ids))
    per_batch = [Counter(k[0] for k in b["keys"]) for b in batches]
    if mode == "batch":
        assert all(len(c) == 1 for c in per_batch)  # one task per global batch
        n = len(batches)
        assert abs(sum(c["A"] > 0 for c in per_batch) - weights[0] * n) < 1
    else:
        n = len(keys)
        assert abs(sum(k.startswith("A-") for k in keys) - weights[0] * n) < 1


def test_ranks_are_balanced_and_cover_each_sample_once_per_epoch(shard_root):
    # proportional weights and a finite epoch, as the reference's group_by_task; 3 ranks x 2 workers
    # is more than the shards of source B, which the sample-level split handles
    tasks = [TaskMix("a", [str(shard_root)], sources=["A"]), TaskMix("b", [str(shard_root)], sources=["B"])]
    mix = mix_of(shard_root, tasks=tasks, batch_size=2, finite=True)
    loaders = [build_loader(mix, rank=r, world_size=3, num_workers=2) for r in range(3)]
    epoch = [list(loader) for loader in loaders]
    assert len({len(e) for e in epoch}) == 1 and len(epoch[0]) == loaders[0].batches_per_epoch
    keys = [k for e in epoch for b in e for k in b["keys"]]
    sizes = {t: len(loaders[0].plan.tasks[i]) for i, t in enumerate("AB")}
    counts = Counter(keys)
    assert max(counts.values()) == 1  # nothing twice within an epoch
    for source, n in sizes.items():  # everything but each task's last partial global batch
        assert sum(k.startswith(source) for k in counts) == n - n % 6
    # the next epoch is a fresh order of the same samples, again balanced
    second = [list(loader) for loader in loaders]
    assert len({len(e) for e in second}) == 1
    assert [b["keys"] for b in second[0]] != [b["keys"] for b in epoch[0]]


def test_batch_shapes_padding_and_uint8_images(shard_root):
    import pyarrow.parquet as pq

    limit = int(np.median(pq.read_table(shard_root / "index.parquet").column("n_tokens").to_numpy()))
    tasks = [TaskMix("all", [str(shard_root)])]
    mix = mix_of(shard_root, tasks=tasks, batch_size=3, max_tokens=limit)
    loader = build_loader(mix)
    (batch,) = take(loader, 1)
    (raw,) = take(build_loader(mix_of(shard_root, tasks=tasks, batch_size=3, max_tokens=limit, uint8_images=True)), 1)
    B, T = batch["images"].shape[:2]
    assert batch["images"].shape == (3, T, 3, 32, 32) and batch["images"].dtype == torch.float32
    assert batch["labels"].shape == batch["input_ids"].shape
    assert torch.equal(batch["attention_mask"], batch["input_ids"] != 151643)
    assert raw["images"].dtype == torch.uint8
    for i, n in enumerate(batch["n_images"].tolist()):
        assert torch.allclose(batch["images"][i, :n], raw["images"][i, :n].float() / 127.5 - 1.0)
        assert (batch["images"][i, n:] == 0).all() and (raw["images"][i, n:] == 0).all()
    assert batch["images"].min() >= -1 and batch["images"].max() <= 1
    for i in range(B):
        steps = (batch["time_ids"][i] >= 0).sum().item()
        assert (batch["time_ids"][i, steps:] == -1).all()
        tokens = batch["attention_mask"][i].sum().item()
        assert (batch["labels"][i, tokens:] == -100).all()
        assert (batch["input_ids"][i] == -200).sum() == batch["n_images"][i] - batch["n_history"][i]
        assert (batch["input_ids"][i] == -300).sum() == (batch["n_history"][i] > 0)
    # samples over max_tokens are left out up front and counted, never cut (cutting loses placeholders)
    assert loader.plan.tasks[0].too_long >= 1
    assert len(loader.plan.tasks[0]) + loader.plan.tasks[0].too_long == pq.read_table(shard_root / "index.parquet").num_rows
    assert batch["input_ids"].shape[1] <= limit


def test_augmentation_is_seeded_and_per_frame(shard_root):
    plain = take(build_loader(mix_of(shard_root, batch_size=2)), 3)
    aug = take(build_loader(mix_of(shard_root, batch_size=2, augment=True)), 3)
    again = take(build_loader(mix_of(shard_root, batch_size=2, augment=True)), 3)
    assert [b["keys"] for b in plain] == [b["keys"] for b in aug]  # augmentation changes pixels, not order
    assert all(torch.equal(x["images"], y["images"]) for x, y in zip(aug, again))
    assert any(not torch.equal(x["images"], y["images"]) for x, y in zip(plain, aug))


def test_mix_config_is_strict_and_checked(shard_root, tmp_path):
    assert load_mix("configs/data/demo.yaml").tasks[0].sources == ["SimRoom"]
    path = tmp_path / "mix.yaml"
    path.write_text("tasks: [{name: a, shards: [x], wieght: 2}]\n")
    with pytest.raises(ConfigError, match="unknown key.*tasks\\[0\\].wieght"):
        load_mix(path)
    with pytest.raises(ConfigError, match="give every task a weight, or none"):
        MixConfig(tasks=[TaskMix("a", ["x"], weight=1.0), TaskMix("b", ["y"])]).validate()
    with pytest.raises(ValueError, match="sharded at image size 32, the mix expects 384"):
        build_loader(MixConfig(tasks=[TaskMix("a", [str(shard_root)])]))
    with pytest.raises(ValueError, match="no complete 'val' split"):
        build_loader(mix_of(shard_root, tasks=[TaskMix("a", [str(shard_root)], split="val")]))


class Boom:
    def __reduce__(self):  # unpickling this would create a file
        return (open, ("/tmp/streamvln-pickle-ran", "w"))


def rewrite_sample(task_dir, key, change):
    """Rewrite the shard holding `key` with change(members) applied to that sample (index kept consistent)."""
    import pyarrow.parquet as pq

    from pipeline.shard_writer import ShardWriter

    index = pq.read_table(task_dir / "index.parquet").to_pylist()
    shard = next(r["shard"] for r in index if r["key"] == key)
    with tarfile.open(task_dir / shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    samples = {}
    for name, data in members:
        k, _, ext = name.partition(".")
        samples.setdefault(k, []).append((ext, data))
    samples[key] = change(samples[key])
    writer = ShardWriter(task_dir / shard)
    offsets = {k: writer.write(k, v) for k, v in samples.items()}
    writer.close()
    table = pq.read_table(task_dir / "index.parquet").to_pydict()
    for i, k in enumerate(table["key"]):
        if k in offsets:
            table["offset"][i], table["size"][i] = offsets[k]
    import pyarrow as pa
    pq.write_table(pa.table(table), task_dir / "index.parquet")


@pytest.fixture
def own_shards(tmp_path, tokenizer_dir):
    """Self-contained samples (frame_storage: sample), so rewriting one sample moves nothing it points at."""
    src = write_source(tmp_path / "data", "A", [episode(i, 12) for i in range(6)])
    run_nav([src], tmp_path / "shards", NavShardConfig(image_size=32, samples_per_shard=2, frame_storage="sample"),
            tokenizer_dir, progress=False)
    return tmp_path / "shards" / "nav"


@pytest.fixture
def episode_shards(tmp_path, tokenizer_dir):
    src = write_source(tmp_path / "data", "A", [episode(i, 40) for i in range(3)])
    run_nav([src], tmp_path / "shards", NavShardConfig(image_size=32, samples_per_shard=2), tokenizer_dir,
            progress=False)
    return tmp_path / "shards" / "nav"


def patch_in_place(task_dir, member_name, change):
    """Replace a member's bytes without moving anything: the result is padded (json: with spaces) to its size."""
    shard = next(task_dir.glob("*.tar"))
    for path in sorted(task_dir.glob("*.tar")):
        with tarfile.open(path) as tar:
            if member_name in tar.getnames():
                shard, info = path, tar.getmember(member_name)
                old = tar.extractfile(info).read()
                break
    new = change(old)
    assert len(new) <= len(old)
    with open(shard, "r+b") as f:
        f.seek(info.offset_data)
        f.write(new + b" " * (len(old) - len(new)))


def test_frames_referenced_from_the_episode_record_are_checked(episode_shards):
    mix = MixConfig(tasks=[TaskMix("a", [str(episode_shards)])], image_size=32, batch_size=1, finite=True)
    assert len(list(build_loader(mix))) > 3  # intact: every sample reads
    key = "A-1-i0-s0000"
    patch_in_place(episode_shards, f"{key}.json", lambda old: json.dumps(
        {**json.loads(old), "frame_ranges": [[-5, 10]] * json.loads(old)["n_frames"]}, separators=(",", ":")).encode())
    with pytest.raises(CorruptSample, match=f"sample {key} has invalid frame_ranges"):
        list(build_loader(mix))
    # a frame of episode 2's record broken in place: both its samples use it (as current or history frame)
    patch_in_place(episode_shards, "A-2-frames.00004.jpg", lambda old: b"\xff\xd8 broken")
    mix2 = MixConfig(tasks=[TaskMix("a", [str(episode_shards)], sources=["A"])], image_size=32, batch_size=1,
                     finite=True, skip_corrupt=True)
    loader = build_loader(mix2)
    keys = [k for b in loader for k in b["keys"]]
    assert not {key, "A-2-i0-s0000", "A-2-i0-s0032"} & set(keys) and {"A-0-i0-s0000", "A-1-i0-s0032"} <= set(keys)
    assert loader.skipped >= 3


def test_pickle_members_are_never_loaded(own_shards):
    import pathlib

    marker = pathlib.Path("/tmp/streamvln-pickle-ran")
    marker.unlink(missing_ok=True)
    key = "A-2-i0-s0000"
    rewrite_sample(own_shards, key, lambda m: m + [("pth", pickle.dumps(Boom())), ("pickle", pickle.dumps(Boom()))])
    mix = MixConfig(tasks=[TaskMix("a", [str(own_shards)])], image_size=32, batch_size=6)
    with pytest.raises(CorruptSample, match=f"sample {key} has member '{key}.pth'; only json, npy and jpg"):
        take(build_loader(mix), 1)
    assert not marker.exists()


def test_corrupt_sample_is_an_error_or_skipped_and_counted(own_shards):
    key = "A-3-i0-s0000"
    rewrite_sample(own_shards, key, lambda m: [(e, b"\xff\xd8 broken" if e.endswith("jpg") else d) for e, d in m])
    mix = MixConfig(tasks=[TaskMix("a", [str(own_shards)])], image_size=32, batch_size=1)
    with pytest.raises(CorruptSample, match=rf"train-\d+\.tar: sample {key}: JPEG does not decode"):
        list(islice(iter(build_loader(MixConfig(**{**mix.__dict__, "finite": True}))), 10))
    skipping = MixConfig(**{**mix.__dict__, "finite": True, "skip_corrupt": True})
    loaders = [build_loader(skipping, rank=r, world_size=2) for r in range(2)]
    epochs = [list(loader) for loader in loaders]
    assert len(epochs[0]) == len(epochs[1]) == 3  # ranks stay balanced
    assert sum(loader.skipped for loader in loaders) == 1
    assert key not in [k for e in epochs for b in e for k in b["keys"]]
    assert sum(loader.state_dict()["skipped"] for loader in loaders) == 1


def test_truncated_shard_names_shard_and_key(own_shards):
    shard = own_shards / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    mix = MixConfig(tasks=[TaskMix("a", [str(own_shards)])], image_size=32, batch_size=6)
    with pytest.raises(CorruptSample, match=r"train-000002\.tar: sample A-\d-i0-s0000 (is cut short|does not parse)"):
        take(build_loader(mix), 1)
