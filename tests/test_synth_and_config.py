"""Demo data generator (format, determinism, learnable signal) and the strict YAML configs."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ConfigError, NavShardConfig, dump_config, load_config
from pipeline.frames import FORWARD, LEFT, RIGHT
from pipeline.nav import run_nav
from pipeline.synth import COLOURS, write_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    write_demo(out, episodes=6, val_episodes=2, seed=3, width=160, height=120)
    return out


def test_demo_is_in_streamvln_format(demo):
    for source in ("R2R", "RxR", "val/R2R", "val/RxR"):
        episodes = json.loads((demo / source / "annotations.json").read_text())
        for ep in episodes:
            assert ep["actions"][0] == -1 and set(ep["actions"][1:]) <= {0, 1, 2, 3}
            frames = sorted((demo / source / ep["video"] / "rgb").iterdir())
            assert [f.name for f in frames] == [f"{i:03d}.jpg" for i in range(1, len(ep["actions"]) + 1)]
            assert isinstance(ep["instructions"], list) and all(ep["instructions"])
    r2r = json.loads((demo / "R2R" / "annotations.json").read_text())
    assert all(len(ep["instructions"]) == 3 for ep in r2r)  # R2R-like: three paraphrases
    train_ids = {ep["id"] for ep in r2r}
    assert not train_ids & {ep["id"] for ep in json.loads((demo / "val/R2R/annotations.json").read_text())}


def test_demo_is_deterministic(demo, tmp_path):
    write_demo(tmp_path, episodes=6, val_episodes=2, seed=3, width=160, height=120)
    for path in sorted(demo.rglob("*")):
        if path.is_file():
            assert (tmp_path / path.relative_to(demo)).read_bytes() == path.read_bytes(), path


def test_expert_action_is_visible_and_depends_on_the_instruction(demo):
    agree = total = 0
    for source in ("R2R", "RxR"):
        for ep in json.loads((demo / source / "annotations.json").read_text()):
            colour = re.search(r"the (\w+) (pillar|column)", ep["instructions"][0]).group(1)
            for t, action in enumerate(ep["actions"][1:]):
                img = np.asarray(Image.open(demo / source / ep["video"] / "rgb" / f"{t + 1:03d}.jpg")).astype(int)
                mask = np.abs(img - np.array(COLOURS[colour])).max(axis=2) < 40
                if not mask.any():
                    continue
                offset = np.nonzero(mask)[1].mean() / img.shape[1] - 0.5
                expected = {LEFT: offset < -0.03, RIGHT: offset > 0.03, FORWARD: abs(offset) < 0.1}[action]
                agree += expected
                total += 1
    assert total > 50 and agree / total > 0.9


def test_demo_shards_without_rejects(demo, tokenizer_dir, tmp_path):
    cfg = NavShardConfig(image_size=64)
    summary = run_nav([demo / "R2R", demo / "RxR"], tmp_path, cfg, tokenizer_dir, progress=False)
    assert summary["manifest"]["counts"]["episodes_rejected"] == 0
    assert summary["manifest"]["counts"]["episodes_written"] == 12


def test_config_loading_is_strict(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("num_frames: 16\nremove_init_turns: true\n")
    cfg = load_config(NavShardConfig, path, {"num_history": 4, "seed": None})
    assert (cfg.num_frames, cfg.remove_init_turns, cfg.num_history, cfg.seed) == (16, True, 4, 0)
    assert load_config(NavShardConfig, None) == NavShardConfig()
    assert load_config(NavShardConfig, "configs/shards/nav.yaml") == NavShardConfig()  # file = defaults
    for text, message in [
        ("num_frame: 16\n", "unknown key"),
        ("num_frames: '16'\n", "expected int"),
        ("num_frames: true\n", "expected int"),
        ("remove_init_turns: 1\n", "expected bool"),
        ("num_frames: 0\n", "num_frames must be >= 1"),
        ("history_mode: fancy\n", "history_mode must be"),
        ("- 1\n", "top level must be a mapping"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(NavShardConfig, path)
    assert "num_frames: 32" in dump_config(NavShardConfig())
    # YAML 1.1 reads 1e-5 (no dot) as a string: a float field takes it as the number it means, nothing else does
    from streamvln.config import TrainConfig

    path.write_text("checkpoint: runs/a\nlr: 1e-5\nweight_decay: -2E+1\n")
    cfg = load_config(TrainConfig, path)
    assert (cfg.lr, cfg.weight_decay) == (1e-5, -20.0)
    for text, message in [("lr: 'fast'\n", "expected float"), ("lr: '1e-5x'\n", "expected float"),
                          ("max_steps: 1e3\n", "is not int")]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(TrainConfig, path)


def test_every_shipped_config_loads_strictly():
    from pathlib import Path

    import yaml

    from streamvln.config import load_train_config
    from streamvln.data import load_mix
    from streamvln.model import StreamVLNConfig

    root = Path(__file__).resolve().parent.parent / "configs"
    from pipeline.config import CalvinShardConfig, MMC4ShardConfig, ScanQAShardConfig, VideoQAShardConfig
    from streamvln.model.build import model_class

    shard_configs = {"videoqa": VideoQAShardConfig, "scanqa": ScanQAShardConfig, "mmc4": MMC4ShardConfig,
                     "calvin_demo": CalvinShardConfig, "calvin_ladder": CalvinShardConfig, "grounding": ScanQAShardConfig}
    for path in (root / "shards").glob("*.yaml"):
        cls = shard_configs.get(path.stem, NavShardConfig)
        # the reference files state the defaults; the demo files are the demos' own
        assert load_config(cls, path) == cls() or path.stem in ("demo", "calvin_demo", "calvin_ladder", "grounding",
                                                                      "describe")
    for path in (root / "data").glob("*.yaml"):
        assert load_mix(path).tasks
    for path in (root / "train").glob("*.yaml"):
        load_train_config(path)
    assert sorted(p.stem for p in (root / "model").glob("*.yaml")) == ["demo", "demo_vla", "tiny", "tiny_vla"]
    for path in (root / "model").glob("*.yaml"):
        keys = yaml.safe_load(path.read_text())
        config = model_class(keys.pop("model_type", None)).config_class(**keys)
        assert isinstance(config, StreamVLNConfig) and config.vision_tower_config()
    from streamvln.sim.episodes import EpisodeGenConfig
    from streamvln.sim.trajectories import TrajectoryConfig

    assert load_config(TrajectoryConfig, root / "sim" / "trajectories.yaml") == TrajectoryConfig()  # = defaults
    for name in ("search", "describe"):  # the options beyond the reference, each on top of the defaults
        load_config(TrajectoryConfig, root / "sim" / f"trajectories_{name}.yaml").validate()
    described = load_config(NavShardConfig, root / "shards" / "describe.yaml")
    described.validate()
    from streamvln.sim.world import COLOURS
    assert described.describe and described.decoy_words == list(COLOURS)
    assert load_config(EpisodeGenConfig, root / "sim" / "episodes_train.yaml") == EpisodeGenConfig()
    from streamvln.sim.grounding import GroundingConfig
    assert load_config(GroundingConfig, root / "sim" / "grounding.yaml") == GroundingConfig()  # = defaults
    from streamvln.dagger.policy import DaggerConfig
    assert load_config(DaggerConfig, root / "dagger" / "reference.yaml") == DaggerConfig()  # = defaults
    assert load_config(DaggerConfig, root / "dagger" / "describe.yaml") == DaggerConfig(describe=True)
    for path in (root / "deepspeed").glob("*.json"):
        assert json.loads(path.read_text())["zero_optimization"]["stage"] in (2, 3)


def test_synth_no_nav_writes_no_pillar_world(tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    r = CliRunner().invoke(main, ["synth", "--out", str(tmp_path / "d"), "--no-nav", "--cotrain", "0"])
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "d" / "R2R").exists()
    r = CliRunner().invoke(main, ["synth", "--out", str(tmp_path / "e"), "--episodes", "1", "--val-episodes", "0",
                                  "--cotrain", "0", "--width", "32", "--height", "24"])
    assert r.exit_code == 0 and (tmp_path / "e" / "R2R" / "annotations.json").exists()
