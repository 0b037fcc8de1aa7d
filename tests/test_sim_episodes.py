"""Episode generation, the VLN-CE reader/writer on hand-written R2R and RxR files, and bad episode files."""

from __future__ import annotations

import gzip
import json
import math

import pytest

from streamvln.sim.episodes import (EpisodeFileError, EpisodeGenConfig, generate_episodes, read_episodes,
                                    write_episodes)
from streamvln.sim.navgrid import NavGrid
from streamvln.sim.world import generate_scene

R2R_ENTRY = {  # the shape of a VLN-CE R2R val_unseen episode, written by hand
    "episode_id": 71, "trajectory_id": 4, "scene_id": "mp3d/2azQ1b91cZZ/2azQ1b91cZZ.glb",
    "start_position": [-16.2, 0.12, 0.86], "start_rotation": [0, 0.97, 0, -0.24],
    "info": {"geodesic_distance": 6.42},
    "goals": [{"position": [-12.1, 0.12, 3.4], "radius": 3.0}],
    "instruction": {"instruction_text": "Walk past the table and stop at the door.", "instruction_tokens": [1, 2]},
    "reference_path": [[-16.2, 0.12, 0.86], [-14.0, 0.12, 2.0], [-12.1, 0.12, 3.4]],
}
RXR_ENTRY = {  # RxR keeps more keys on the instruction
    "episode_id": "9", "trajectory_id": "2", "scene_id": "mp3d/zsNo4HB9uLZ/zsNo4HB9uLZ.glb",
    "start_position": [1.0, 0.1, 2.0], "start_rotation": [0, 0, 0, 1],
    "goals": [{"position": [3.0, 0.1, 2.0], "radius": 3.0}],
    "instruction": {"instruction_id": "9", "language": "en-US", "annotator_id": "55",
                    "instruction_text": "You are facing a couch. Turn right and walk to the door."},
    "reference_path": [[1.0, 0.1, 2.0], [3.0, 0.1, 2.0]],
}


def write_json_gz(path, payload):
    path.write_bytes(gzip.compress(json.dumps(payload).encode()))
    return path


def test_reads_hand_written_r2r_and_rxr(tmp_path):
    eps = read_episodes(write_json_gz(tmp_path / "val.json.gz", {"episodes": [R2R_ENTRY, RXR_ENTRY]}))
    assert [e.episode_id for e in eps] == [71, "9"]
    assert eps[0].instruction_text == "Walk past the table and stop at the door."
    assert eps[0].goal_position == [-12.1, 0.12, 3.4] and len(eps[0].reference_path) == 3
    assert eps[1].instruction["language"] == "en-US"
    assert eps[1].start_heading == pytest.approx(0.0)


@pytest.mark.parametrize("mutate, message", [
    (lambda e: e.pop("goals"), r"episodes\[1\] \(episode_id=9\): missing key\(s\): goals"),
    (lambda e: e.update(start_position=[1, 2]), r"episodes\[1\].*start_position must be a list of 3 numbers"),
    (lambda e: e["instruction"].update(instruction_text=""), r"episodes\[1\].*instruction_text"),
    (lambda e: e.update(goals=[]), r"episodes\[1\].*goals must be a non-empty list"),
    (lambda e: e.update(episode_id=71), r"episodes\[1\]: duplicate episode_id 71"),
])
def test_malformed_episode_names_file_and_position(tmp_path, mutate, message):
    bad = json.loads(json.dumps(RXR_ENTRY))
    mutate(bad)
    path = write_json_gz(tmp_path / "bad.json.gz", {"episodes": [R2R_ENTRY, bad]})
    with pytest.raises(EpisodeFileError, match=message) as e:
        read_episodes(path)
    assert str(path) in str(e.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(EpisodeFileError, match="not found"):
        read_episodes(tmp_path / "missing.json.gz")
    (tmp_path / "x.json.gz").write_bytes(gzip.compress(b'{"episodes": [1,'))
    with pytest.raises(EpisodeFileError, match="invalid JSON at line 1, column"):
        read_episodes(tmp_path / "x.json.gz")
    (tmp_path / "y.json.gz").write_bytes(b"not gzip")
    with pytest.raises(EpisodeFileError, match="cannot be read"):
        read_episodes(tmp_path / "y.json.gz")
    write_json_gz(tmp_path / "z.json.gz", [R2R_ENTRY])
    with pytest.raises(EpisodeFileError, match="'episodes' list"):
        read_episodes(tmp_path / "z.json.gz")


@pytest.fixture(scope="module")
def generated():
    return generate_episodes(EpisodeGenConfig(split="train", scenes=3, per_scene=3, seed=0))[0]


def test_generated_episodes_are_valid(generated):
    assert len(generated) == 3 * 3 * 3  # scenes x paths x (2 R2R + 1 RxR)
    by_traj = {}
    for ep in generated:
        by_traj.setdefault(ep.trajectory_id, []).append(ep)
    assert len(by_traj) == 9
    for group in by_traj.values():
        assert [e.instruction["style"] for e in group] == ["r2r", "r2r", "rxr"]
        assert len({e.instruction_text for e in group}) == 3  # paraphrases differ
        assert len({json.dumps(e.reference_path) for e in group}) == 1
    grids = {}
    for ep in generated:
        spec = generate_scene(ep.scene_id)
        grid = grids.setdefault(ep.scene_id, NavGrid(spec))
        start, goal = ep.start_position, ep.goal_position
        assert ep.reference_path[0] == [start[0], 0.0, start[2]] and ep.reference_path[-1] == [goal[0], 0.0, goal[2]]
        assert grid.is_navigable(goal[0], goal[2]) and not grid.collides(start[0], start[2])
        geo = grid.geodesic((start[0], start[2]), (goal[0], goal[2]))
        assert math.isfinite(geo) and geo == pytest.approx(ep.info["geodesic_distance"], rel=0.02)
        # the reference path is a shortest path: its length is the geodesic distance
        ref = sum(math.dist(p, q) for p, q in zip(ep.reference_path, ep.reference_path[1:]))
        assert ref == pytest.approx(geo, rel=0.02)
        assert all(math.dist(p, q) <= 2.0 + 1e-6 for p, q in zip(ep.reference_path, ep.reference_path[1:]))
        goal_obj = ep.info["goal_object"]
        assert goal_obj in ep.instruction_text
        start_room = spec.rooms[spec.room_at(start[0], start[2])]
        assert start_room.look in ep.instruction_text


def test_generation_is_deterministic_and_splits_use_disjoint_scenes(tmp_path, generated):
    again = generate_episodes(EpisodeGenConfig(split="train", scenes=3, per_scene=3, seed=0))[0]
    write_episodes(tmp_path / "a.json.gz", generated)
    write_episodes(tmp_path / "b.json.gz", again)
    assert (tmp_path / "a.json.gz").read_bytes() == (tmp_path / "b.json.gz").read_bytes()
    assert [e.to_json() for e in read_episodes(tmp_path / "a.json.gz")] == [e.to_json() for e in generated]
    unseen = generate_episodes(EpisodeGenConfig(split="val_unseen", scenes=3, per_scene=1, seed=0))[0]
    seen = generate_episodes(EpisodeGenConfig(split="val_seen", scenes=3, per_scene=1, seed=1))[0]
    train_scenes = {e.scene_id for e in generated}
    assert not train_scenes & {e.scene_id for e in unseen}
    assert {e.scene_id for e in seen} <= train_scenes
    assert not {json.dumps(e.start_position) for e in seen} & {json.dumps(e.start_position) for e in generated}


def test_config_is_checked():
    with pytest.raises(ValueError, match="unknown split"):
        EpisodeGenConfig(split="val").validate()
