"""VLN-CE R2R/RxR episode files ({split}.json.gz): reading (strict, errors name file and position), writing, generation.

Generated episodes of the `r2r` tier start in one room and end next to a named object in another: the reference path
is the geodesic shortest path (waypoints at most `waypoint_spacing` apart, as R2R's nav-graph nodes
are about 2 m apart), and every path gets several instructions, each its own episode sharing the
path's trajectory_id, as in R2R. The easier rungs of the task ladder (tiers.py) give one episode a path.
"""

from __future__ import annotations

import gzip
import io
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .base import heading_to_quaternion, quaternion_to_heading
from .instructions import r2r_instruction, read_route, rxr_instruction
from .navgrid import NavGrid
from .tiers import TIER_DEFAULTS, TIER_VERSION, TIERS, build_scene, sample_tier_paths, tier_scene_id
from .world import GENERATOR_VERSION, SPLIT_POOLS, parse_scene_id, scene_id_for


class EpisodeFileError(ValueError):
    """An episodes file that cannot be read: names the file and the position of the bad entry."""


@dataclass
class NavEpisode:
    episode_id: int | str
    trajectory_id: int | str
    scene_id: str
    start_position: list[float]
    start_rotation: list[float]
    goals: list[dict]  # [{"position": [x, y, z], "radius": float}]
    reference_path: list[list[float]]
    instruction: dict  # {"instruction_text": str, ...}
    info: dict = field(default_factory=dict)

    @property
    def instruction_text(self) -> str:
        return self.instruction["instruction_text"]

    @property
    def goal_position(self) -> list[float]:
        return self.goals[0]["position"]

    @property
    def start_heading(self) -> float:
        return quaternion_to_heading(self.start_rotation)

    def to_json(self) -> dict:
        return asdict(self)


def _vec(value, n: int, what: str) -> list[float]:
    if not isinstance(value, list) or len(value) != n or not all(isinstance(v, (int, float)) and
                                                                  not isinstance(v, bool) for v in value):
        raise ValueError(f"{what} must be a list of {n} numbers, got {value!r}")
    if not all(math.isfinite(v) for v in value):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return [float(v) for v in value]


def parse_episode(entry) -> NavEpisode:
    """One VLN-CE episode (R2R: instruction_text is a string; RxR: more instruction keys, same shape)."""
    if not isinstance(entry, dict):
        raise ValueError(f"entry is {type(entry).__name__}, not an object")
    missing = [k for k in ("episode_id", "scene_id", "start_position", "start_rotation", "goals", "instruction")
               if k not in entry]
    if missing:
        raise ValueError(f"missing key(s): {', '.join(missing)}")
    goals = entry["goals"]
    if not isinstance(goals, list) or not goals:
        raise ValueError("goals must be a non-empty list")
    parsed_goals = []
    for k, g in enumerate(goals):
        if not isinstance(g, dict) or "position" not in g:
            raise ValueError(f"goals[{k}] must be an object with a position")
        radius = g.get("radius")
        parsed_goals.append({"position": _vec(g["position"], 3, f"goals[{k}].position"),
                             "radius": None if radius is None else float(radius)})
    instruction = entry["instruction"]
    if not isinstance(instruction, dict) or "instruction_text" not in instruction:
        raise ValueError("instruction must be an object with instruction_text")
    text = instruction["instruction_text"]
    if isinstance(text, list):  # some RxR exports keep the text as a list of segments
        text = " ".join(str(t) for t in text)
    if not isinstance(text, str) or not text.strip():
        raise ValueError("instruction_text must be a non-empty string")
    reference = entry.get("reference_path") or []
    if not isinstance(reference, list):
        raise ValueError("reference_path must be a list of [x, y, z]")
    reference = [_vec(p, 3, f"reference_path[{k}]") for k, p in enumerate(reference)]
    scene = entry["scene_id"]
    if not isinstance(scene, str) or not scene:
        raise ValueError("scene_id must be a non-empty string")
    return NavEpisode(
        episode_id=entry["episode_id"], trajectory_id=entry.get("trajectory_id", entry["episode_id"]),
        scene_id=scene, start_position=_vec(entry["start_position"], 3, "start_position"),
        start_rotation=_vec(entry["start_rotation"], 4, "start_rotation"), goals=parsed_goals,
        reference_path=reference, instruction={**instruction, "instruction_text": text},
        info=entry.get("info") or {})


def read_episodes(path: str | Path) -> list[NavEpisode]:
    """All episodes of a VLN-CE episodes file (.json.gz or .json), in file order."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        data = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise EpisodeFileError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise EpisodeFileError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile) as e:
        raise EpisodeFileError(f"{path}: cannot be read: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("episodes"), list):
        raise EpisodeFileError(f"{path}: expected an object with an 'episodes' list (VLN-CE format)")
    episodes, seen = [], set()
    for i, entry in enumerate(data["episodes"]):
        try:
            ep = parse_episode(entry)
        except ValueError as e:
            eid = entry.get("episode_id", "?") if isinstance(entry, dict) else "?"
            raise EpisodeFileError(f"{path}: episodes[{i}] (episode_id={eid}): {e}") from None
        if str(ep.episode_id) in seen:
            raise EpisodeFileError(f"{path}: episodes[{i}]: duplicate episode_id {ep.episode_id}")
        seen.add(str(ep.episode_id))
        episodes.append(ep)
    return episodes


def write_episodes(path: str | Path, episodes: list[NavEpisode], meta: dict | None = None) -> None:
    """Byte-identical for the same episodes: fixed gzip mtime, sorted keys; tmp name, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    words = sorted({w for ep in episodes for w in ep.instruction_text.lower().replace(".", " ").replace(",", " ").split()})
    payload = {"episodes": [ep.to_json() for ep in episodes], "instruction_vocab": {"word_list": words}}
    if meta:
        payload["meta"] = meta
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, filename="") as f:
        f.write(json.dumps(payload, sort_keys=True).encode())
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


@dataclass
class EpisodeGenConfig:
    split: str = "train"
    tier: str = "r2r"  # the task ladder's rung (tiers.TIERS): room | neighbour | r2r
    scenes: int = 40
    per_scene: int = 4  # paths per scene; r2r: each gives r2r_per_path + rxr_per_path episodes, other tiers one
    first_scene: int = 0
    seed: int = 0
    r2r_per_path: int = 2
    rxr_per_path: int = 1
    min_geodesic: float | None = None  # None: the tier's (r2r 4.0, room and neighbour 2.5)
    max_geodesic: float | None = None  # None: the tier's (25.0)
    waypoint_spacing: float = 2.0
    goal_radius: float | None = None  # the success distance each goal carries; None: the tier's (r2r 3.0, else 1.0)
    # easier tiers: episodes sharing each start (position and heading), each to another object (training data
    # that can only be fitted by reading the instruction); per_scene then counts starts
    goals_per_start: int = 1
    min_rooms: int = 2  # r2r scenes only
    max_rooms: int = 6
    agent_radius: float = 0.18

    def validate(self):
        if self.split not in SPLIT_POOLS:
            raise ValueError(f"unknown split {self.split!r}; known: {', '.join(SPLIT_POOLS)}")
        if self.tier not in TIERS:
            raise ValueError(f"unknown tier {self.tier!r}; known: {', '.join(TIERS)}")
        if self.scenes < 1 or self.per_scene < 1 or self.r2r_per_path + self.rxr_per_path < 1:
            raise ValueError("scenes, per_scene and instructions per path must be at least 1")
        if self.goals_per_start < 1 or (self.tier == "r2r" and self.goals_per_start != 1):
            raise ValueError("goals_per_start must be at least 1, and 1 on the r2r tier")
        if (self.min_rooms, self.max_rooms) != (2, 6):
            # the simulator rebuilds a scene from its id alone, with 2-6 rooms: other bounds would
            # describe episodes in scenes that no simulator builds
            raise ValueError("min_rooms/max_rooms other than 2 and 6 are not supported: scenes are rebuilt from "
                             "their id alone")

    def resolved(self) -> "EpisodeGenConfig":
        """A copy with the tier's defaults filled in (what generation uses and the file records)."""
        radius, lo, hi = TIER_DEFAULTS[self.tier]
        return replace(self, goal_radius=radius if self.goal_radius is None else self.goal_radius,
                       min_geodesic=lo if self.min_geodesic is None else self.min_geodesic,
                       max_geodesic=hi if self.max_geodesic is None else self.max_geodesic)

    def meta(self) -> dict:
        """What the episodes file records: the resolved config (an r2r file keeps today's bytes: no tier key)."""
        out = asdict(self.resolved())
        if self.tier == "r2r":
            del out["tier"], out["goals_per_start"]
        return out


def generate_episodes(cfg: EpisodeGenConfig, progress=None) -> tuple[list[NavEpisode], list[dict]]:
    """Episodes for `cfg.scenes` scenes of the split's pool; returns (episodes, scenes that yielded too few)."""
    cfg.validate()
    cfg = cfg.resolved()
    episodes, shortfalls = [], []
    for s in range(cfg.first_scene, cfg.first_scene + cfg.scenes):
        scene_id = tier_scene_id(cfg.tier, scene_id_for(cfg.split, s))
        spec = build_scene(scene_id)
        grid = NavGrid(spec, cfg.agent_radius)
        split_code = list(SPLIT_POOLS).index(cfg.split)
        seed = [GENERATOR_VERSION, cfg.seed, split_code, s]
        rng = np.random.default_rng(seed if cfg.tier == "r2r" else seed + [list(TIERS).index(cfg.tier) + 11])
        made = 0
        for _attempt in range(cfg.per_scene * 20):
            if made == cfg.per_scene:
                break
            sample = _sample_path if cfg.tier == "r2r" else _sample_tier_path
            path_eps = sample(spec, grid, rng, cfg, len(episodes), f"{scene_id}:{made}")
            if path_eps:
                episodes += path_eps
                made += 1
        if made < cfg.per_scene:
            shortfalls.append({"scene_id": scene_id, "paths": made, "wanted": cfg.per_scene})
        if progress:
            progress(1)
    for k, ep in enumerate(episodes):
        ep.episode_id = k
    trajectories = {}
    for ep in episodes:
        ep.trajectory_id = trajectories.setdefault(ep.trajectory_id, len(trajectories))
    return episodes, shortfalls


def _sample_tier_path(spec, grid: NavGrid, rng, cfg: EpisodeGenConfig, base: int, path_key: str) -> list[NavEpisode]:
    """Episodes of an easier rung (one per path; goals_per_start paths share a start): the instruction names
    the goal (tiers.py)."""
    draws = sample_tier_paths(spec, grid, rng, cfg.tier, cfg.min_geodesic, cfg.max_geodesic, _goal_point,
                              cfg.goals_per_start)
    pool, index = parse_scene_id(spec.scene_id)
    out = []
    for k, draw in enumerate(draws):
        (x, z), goal = draw["start"], draw["goal"]
        out.append(NavEpisode(
            episode_id=base + k, trajectory_id=path_key if len(draws) == 1 else f"{path_key}:{k}",
            scene_id=spec.scene_id, start_position=[x, 0.0, z],
            start_rotation=[round(v, 6) for v in heading_to_quaternion(draw["heading"])],
            goals=[{"position": [draw["goal_xz"][0], 0.0, draw["goal_xz"][1]], "radius": cfg.goal_radius}],
            reference_path=[[round(px, 3), 0.0, round(pz, 3)] for px, pz in
                            _waypoints(draw["path"], cfg.waypoint_spacing)],
            instruction={"instruction_text": draw["instruction"], "style": cfg.tier},
            info={"geodesic_distance": round(draw["length"], 4), "goal_object": goal.name, "tier": cfg.tier,
                  "scene_pool": pool, "scene_index": index, "generator_version": GENERATOR_VERSION,
                  "tier_version": TIER_VERSION}))
    return out


def _sample_path(spec, grid: NavGrid, rng, cfg: EpisodeGenConfig, base: int, path_key: str) -> list[NavEpisode]:
    goal = spec.objects[int(rng.integers(len(spec.objects)))]
    start_rooms = [r for r in range(len(spec.rooms)) if r != goal.room]
    start_room = spec.rooms[start_rooms[int(rng.integers(len(start_rooms)))]]
    x = float(rng.uniform(start_room.min_x + 0.4, start_room.max_x - 0.4))
    z = float(rng.uniform(start_room.min_z + 0.4, start_room.max_z - 0.4))
    x, z = round(x, 3), round(z, 3)
    if not grid.is_navigable(x, z):
        return []
    heading = round(float(rng.uniform(-math.pi, math.pi)), 4)
    goal_xz = _goal_point(grid, goal, (x, z))
    if goal_xz is None:
        return []
    path = grid.path((x, z), goal_xz)
    if path is None:
        return []
    length = sum(math.dist(p, q) for p, q in zip(path, path[1:]))
    if not cfg.min_geodesic <= length <= cfg.max_geodesic:
        return []
    waypoints = _waypoints(path, cfg.waypoint_spacing)
    route = read_route(spec, path, heading, goal)
    texts = [("r2r", r2r_instruction(spec, route, rng)) for _ in range(cfg.r2r_per_path)]
    texts += [("rxr", rxr_instruction(spec, route, rng)) for _ in range(cfg.rxr_per_path)]
    out = []
    for k, (style, text) in enumerate(texts):
        out.append(NavEpisode(
            episode_id=base + k, trajectory_id=path_key, scene_id=spec.scene_id,
            start_position=[x, 0.0, z], start_rotation=[round(v, 6) for v in heading_to_quaternion(heading)],
            goals=[{"position": [goal_xz[0], 0.0, goal_xz[1]], "radius": cfg.goal_radius}],
            reference_path=[[round(px, 3), 0.0, round(pz, 3)] for px, pz in waypoints],
            instruction={"instruction_text": text, "style": style},
            info={"geodesic_distance": round(length, 4), "goal_object": goal.name,
                  "scene_pool": parse_scene_id(spec.scene_id)[0], "scene_index": parse_scene_id(spec.scene_id)[1],
                  "generator_version": GENERATOR_VERSION}))
    return out


def _goal_point(grid: NavGrid, obj, start) -> tuple[float, float] | None:
    """A navigable point next to the object (about half a metre from its surface), nearest the start."""
    best = None
    reach = obj.radius + grid.radius + 0.3
    for k in range(16):
        a = 2 * math.pi * k / 16
        p = (round(obj.x + reach * math.cos(a), 3), round(obj.z + reach * math.sin(a), 3))
        if not grid.is_navigable(*p) or grid.spec.room_at(*p) != obj.room:
            continue
        d = grid.grid_distance(p, start)  # one search from the start serves all 16
        if math.isfinite(d) and (best is None or d < best[0]):
            best = (d, p)
    return None if best is None else best[1]


def _waypoints(path, spacing: float) -> list[tuple[float, float]]:
    """The path's corners, with each straight stretch split evenly so no two waypoints are over `spacing` apart."""
    out = [tuple(map(float, path[0]))]
    for p, q in zip(path, path[1:]):
        n = max(int(math.ceil(math.dist(p, q) / spacing - 1e-9)), 1)
        out += [(p[0] + (q[0] - p[0]) * k / n, p[1] + (q[1] - p[1]) * k / n) for k in range(1, n + 1)]
    return out
