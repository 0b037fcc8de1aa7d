"""Grounding questions: rendered views of the training scenes, each asked where its objects are (a co-training source).

A model trained from scratch on the room rung's expert walks learns to walk to *an* object, not to the named
one: the colour word barely changes its loss (docs/results.md). StreamVLN co-trains on scene QA to ground
language in what the camera sees; this is that task for the simulator's scenes. Each view is one frame from a
random pose in a training scene, with one question per object ("Where is the red ball?") answered "left",
"ahead", "right" or "not visible" from the scene's geometry (most views face an object), plus one about an object the scene does not hold.
Questions whose answer sits on a boundary (an object at the frame's edge, between "ahead" and a side, or
partly hidden behind a nearer one) are not asked, so no label is a guess.

Written in the ScanQA source format that `streamvln-shards scanqa` reads: <out>/views/<view>/000.jpg (one frame
a scene folder) and <out>/grounding.json, the conversations, written last and atomically, so a killed run
leaves no file that looks complete; a rerun writes the same bytes.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .base import SimConfig, bearing, wrap
from .episodes import read_episodes
from .tiers import build_scene
from .trajectories import atomic_write, write_video
from .views import blocked, extent, relative_deg
from .world import COLOURS, KINDS

ANSWERS = ("left", "ahead", "right", "not visible")
# SimConfig fields a still view does not use (no step is taken): set to anything but the default, refused
UNUSED_SIM = ("forward_step", "turn_angle", "max_steps", "success_distance")
ROOM_KINDS = ("box", "ball")


@dataclass
class GroundingConfig:
    sim: SimConfig = field(default_factory=lambda: SimConfig(width=224, height=168))
    views_per_scene: int = 8
    ahead_deg: float = 8.0  # |bearing| up to this: "ahead"
    side_deg: float = 12.0  # beyond this (and in view): "left" / "right"; between the two: not asked
    edge_margin_deg: float = 4.0  # in view: the centre this far inside the frame; not visible: all of it this far out
    facing: float = 0.75  # share of views turned towards an object (the rest face anywhere): fewer "not visible"
    question_first: bool = False  # the first question before the frame, as the nav prompt puts its instruction
    describe: bool = True  # first ask what is in view, answered with the objects' colours and places
    absent_questions: int = 1  # questions about a colour and shape the scene does not hold
    jpeg_quality: int = 75
    seed: int = 0

    def validate(self):
        self.sim.validate()
        if self.views_per_scene < 1:
            raise ValueError("views_per_scene must be at least 1")
        if not 0 <= self.facing <= 1:
            raise ValueError("facing must be in [0, 1]")
        if not 0 <= self.ahead_deg <= self.side_deg < self.sim.hfov / 2:
            raise ValueError("need 0 <= ahead_deg <= side_deg < hfov / 2")
        if self.absent_questions < 0:
            raise ValueError("absent_questions must be >= 0")
        if self.edge_margin_deg < 0:
            raise ValueError("edge_margin_deg must be >= 0")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError("jpeg_quality must be in 1..100")
        unused = [k for k in UNUSED_SIM if getattr(self.sim, k) != getattr(SimConfig(), k)]
        if unused:
            raise ValueError(f"sim.{', sim.'.join(unused)}: not used by grounding views (no step is taken)")


def answer(agent, heading: float, obj, others, cfg: GroundingConfig) -> str | None:
    """Where `obj` is seen from the pose, or None on a boundary (not asked)."""
    distance = math.hypot(obj.x - agent[0], obj.z - agent[1])
    rel = relative_deg(agent, heading, obj)
    half = cfg.sim.hfov / 2
    spread = math.degrees(math.atan2(extent(obj), max(distance, 1e-6)))
    if abs(rel) > half + spread + cfg.edge_margin_deg:
        return "not visible"
    if abs(rel) > half - cfg.edge_margin_deg or blocked(agent, obj, others):
        return None
    if abs(rel) <= cfg.ahead_deg:
        return "ahead"
    if abs(rel) >= cfg.side_deg:
        return "left" if rel > 0 else "right"
    return None


PLACES = {"left": "on the left", "ahead": "ahead", "right": "on the right"}


def description(spec, agent, heading, said: dict) -> str | None:
    """What is in view, left to right ("the red ball on the left and the blue box ahead.", or "nothing."); None
    when any object's place is unclear. Naming colours is what ties the tied embedding's colour words to what
    the tower sees, which the questions alone teach slowly (docs/results.md)."""
    if any(a is None for a in said.values()):
        return None
    seen = sorted((o for o in spec.objects if said[o] != "not visible"),
                  key=lambda o: -relative_deg(agent, heading, o))
    parts = [f"the {o.name} {PLACES[said[o]]}" for o in seen]
    if not parts:
        return "nothing."
    return (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]) + "."


def view_questions(spec, agent, heading, rng, cfg: GroundingConfig) -> list[tuple[str, str]]:
    """(question, answer): what is in view first (when `describe` and every place is clear), then where each
    object with a clear answer is and where the absent ones are, in a seeded order."""
    said = {o: answer(agent, heading, o, [p for p in spec.objects if p is not o], cfg) for o in spec.objects}
    qa = [(f"Where is the {obj.name}?", a) for obj, a in said.items() if a is not None]
    held = {(o.colour, o.kind) for o in spec.objects}
    absent = [(c, k) for c in COLOURS for k in ROOM_KINDS if (c, k) not in held]
    for i in rng.permutation(len(absent))[:cfg.absent_questions].tolist():
        colour, kind = absent[i]
        qa.append((f"Where is the {colour} {KINDS[kind][3]}?", "not visible"))
    qa = [qa[i] for i in rng.permutation(len(qa)).tolist()]
    seen = description(spec, agent, heading, said) if cfg.describe else None
    return ([("What do you see?", seen)] if seen else []) + qa


def random_pose(spec, grid, rng, cfg: GroundingConfig):
    """A navigable position anywhere in the room; the heading, with probability `facing`, puts a random object
    somewhere in the field of view, else is uniform."""
    room = spec.rooms[0]
    for _ in range(200):
        x = round(float(rng.uniform(room.min_x + 0.4, room.max_x - 0.4)), 3)
        z = round(float(rng.uniform(room.min_z + 0.4, room.max_z - 0.4)), 3)
        if grid.is_navigable(x, z):
            if rng.random() < cfg.facing:
                obj = spec.objects[int(rng.integers(len(spec.objects)))]
                offset = rng.uniform(-1, 1) * math.radians(cfg.sim.hfov / 2)
                heading = wrap(bearing((x, z), (obj.x, obj.z)) + offset)
            else:
                heading = rng.uniform(-math.pi, math.pi)
            return (x, z), round(float(heading), 4)
    raise ValueError(f"{spec.scene_id}: no navigable pose found")


def write_grounding(episodes_path, out, cfg: GroundingConfig, progress=None) -> dict:
    """Views and questions for every scene of an episodes file (in order of first appearance)."""
    from .miniworld_sim import MiniWorldSim  # rendering only here: the question logic needs no GL

    cfg.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scenes = list(dict.fromkeys(e.scene_id for e in read_episodes(episodes_path)))
    records, answers, skipped = [], dict.fromkeys((*ANSWERS, "description"), 0), 0
    with MiniWorldSim(cfg.sim) as sim:
        for index, scene_id in enumerate(scenes):
            spec, grid = sim.scene(scene_id)
            if len(spec.rooms) != 1:
                raise ValueError(f"{scene_id}: grounding views are for one-room scenes (tier room)")
            sim.load_scene(scene_id)
            for k in range(cfg.views_per_scene):
                rng = np.random.default_rng([cfg.seed, index, k])
                agent, heading = random_pose(spec, grid, rng, cfg)
                qa = view_questions(spec, agent, heading, rng, cfg)
                if not qa:  # only possible with absent_questions 0: nothing to ask of this view (counted)
                    skipped += 1
                    continue
                view = f"views/{scene_id}_v{k:02d}"
                rgb = sim.teleport((agent[0], 0.0, agent[1]), heading).rgb
                write_video(out / view, [rgb], cfg.jpeg_quality, 0)
                turns = []
                for n, (q, a) in enumerate(qa):
                    first = (f"{q}\n<video>" if cfg.question_first else f"<video>\n{q}") if n == 0 else q
                    turns += [{"from": "human", "value": first},
                              {"from": "gpt", "value": a}]
                    answers[a if a in answers else "description"] += 1
                records.append({"id": f"{scene_id}_v{k:02d}", "video": f"{view}/rgb", "scene_id": scene_id,
                                "pose": [agent[0], agent[1], heading], "conversations": turns})
            if progress:
                progress(1)
    atomic_write(out / "grounding.json", json.dumps(records, indent=1) + "\n")
    meta = {"episodes": str(episodes_path), "scenes": len(scenes), "views": len(records), "views_skipped": skipped,
            "questions": sum(answers.values()), "answers": answers,
            "config": asdict(cfg)}
    atomic_write(out / "grounding_meta.json", json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return meta
