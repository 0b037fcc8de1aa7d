"""Demo data: a small procedural world written in the exact StreamVLN trajectory format.

Coloured pillars stand on a floor; the instruction names one of them. The expert turns 15 degrees
at a time until the named pillar is centred, then walks 25 cm at a time straight toward it and stops
once it is close (or once a step would lead away from it). The camera sees all around (an equiangular
360-degree panorama, straight ahead in the middle), so the pillar named is always in view: the right
action is visible in the frame, and it depends on the instruction, since another pillar would call
for another action.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .frames import FORWARD, LEFT, RIGHT

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
STEP_M, TURN_DEG, STOP_M, ALIGN_DEG = 0.25, 15.0, 1.0, 7.5
MAX_STEPS = 200

R2R_TEMPLATES = (
    "Walk to the {c} pillar and stop next to it.",
    "Go toward the {c} pillar. Stop when you reach it.",
    "Head over to the {c} column and wait there.",
)
RXR_TEMPLATES = (
    "Look around until you find the {c} pillar, turn so that it is straight ahead of you, then walk "
    "up to it and stop right in front of it.",
    "Your goal is the {c} column. Face it first, walk straight toward it and stop once you are next to it.",
)


@dataclass(frozen=True)
class SourceStyle:
    name: str
    templates: tuple[str, ...]
    instructions_per_episode: int
    num_pillars: int
    sky: tuple[int, int, int]
    floor: tuple[int, int, int]


STYLES = (
    SourceStyle("R2R", R2R_TEMPLATES, 3, 3, (150, 180, 215), (120, 105, 90)),
    SourceStyle("RxR", RXR_TEMPLATES, 1, 4, (190, 190, 200), (95, 110, 95)),
)


def expert_episode(rng: np.random.Generator, num_pillars: int):
    """Pillar layout, the goal, and the expert's states and actions (STOP excluded, as on disk)."""
    colours = rng.choice(list(COLOURS), size=num_pillars, replace=False)
    heading = 0.0
    pillars = []
    for _ in range(num_pillars):
        bearing = math.radians(rng.uniform(-180, 180))
        dist = rng.uniform(1.5, 7.5)
        pillars.append((dist * math.cos(bearing), dist * math.sin(bearing)))
    goal = int(rng.integers(num_pillars))
    x, y = 0.0, 0.0
    states, actions = [], []
    walking = False
    for _ in range(MAX_STEPS):
        states.append((x, y, heading))
        gx, gy = pillars[goal]
        delta = _wrap(math.degrees(math.atan2(gy - y, gx - x)) - heading)
        dist = math.hypot(gx - x, gy - y)
        ahead = math.hypot(gx - x - STEP_M * math.cos(math.radians(heading)),
                           gy - y - STEP_M * math.sin(math.radians(heading)))
        # Turn until the goal is centred, then walk straight (no re-aiming, whose small corrections
        # would hinge on a pixel or two) and stop once close or once a step would lead away from it.
        if not walking and abs(delta) > ALIGN_DEG:
            action = LEFT if delta > 0 else RIGHT
            heading = _wrap(heading + (TURN_DEG if action == LEFT else -TURN_DEG))
        elif dist > STOP_M and ahead < dist:
            walking, action = True, FORWARD
            x, y = x + STEP_M * math.cos(math.radians(heading)), y + STEP_M * math.sin(math.radians(heading))
        else:
            break  # STOP: not recorded, the reference appends it after the last frame
        actions.append(action)
    return list(colours), pillars, goal, states, actions


def _wrap(deg: float) -> float:
    return (deg + 180.0) % 360.0 - 180.0


def render(state, pillars, colours, style: SourceStyle, width: int, height: int, shade: float) -> np.ndarray:
    """First-person view: sky, floor, and a bar per pillar whose size falls with distance."""
    x, y, heading = state
    img = np.empty((height, width, 3), np.float32)
    horizon = height // 2
    rows = np.linspace(0.0, 1.0, height - horizon)[:, None, None]
    img[:horizon] = np.array(style.sky, np.float32)
    img[horizon:] = np.array(style.floor, np.float32) * (0.7 + 0.5 * rows)
    order = sorted(range(len(pillars)), key=lambda i: -math.hypot(pillars[i][0] - x, pillars[i][1] - y))
    for i in order:
        px, py = pillars[i]
        dist = max(math.hypot(px - x, py - y), 0.2)
        delta = _wrap(math.degrees(math.atan2(py - y, px - x)) - heading)
        cx = width / 2 - delta / 180.0 * width / 2
        half_w = max(1.0, 0.4 / dist * width / 4)
        top = horizon - 1.6 / dist * height / 3
        bottom = horizon + 0.6 / dist * height / 3
        x0, x1 = int(max(0, cx - half_w)), int(min(width, cx + half_w))
        y0, y1 = int(max(0, top)), int(min(height, bottom))
        if x1 > x0 and y1 > y0:
            img[y0:y1, x0:x1] = np.array(COLOURS[colours[i]], np.float32)
    return np.clip(img * shade, 0, 255).astype(np.uint8)


def write_source(out: Path, style: SourceStyle, episodes: int, seed: int, width: int, height: int,
                 first_id: int = 0) -> int:
    """One source folder (annotations.json + images/<video>/rgb/NNN.jpg); returns frames written."""
    out.mkdir(parents=True, exist_ok=True)
    annotations, frames = [], 0
    for n in range(episodes):
        episode_id = first_id + n
        rng = np.random.default_rng([seed, sum(map(ord, style.name)), episode_id])
        colours, pillars, goal, states, actions = expert_episode(rng, style.num_pillars)
        templates = rng.permutation(len(style.templates))[: style.instructions_per_episode]
        instructions = [style.templates[t].format(c=colours[goal]) for t in templates]
        video = f"images/{style.name.lower()}_{episode_id:06d}"
        rgb = out / video / "rgb"
        rgb.mkdir(parents=True, exist_ok=True)
        shade = float(rng.uniform(0.85, 1.1))
        for t, state in enumerate(states):
            frame = render(state, pillars, colours, style, width, height, shade)
            Image.fromarray(frame).save(rgb / f"{t + 1:03d}.jpg", quality=90)
        frames += len(states)
        annotations.append({"id": episode_id, "video": video, "instructions": instructions, "actions": [-1] + actions})
    (out / "annotations.json").write_text(json.dumps(annotations, indent=1) + "\n")
    return frames


def write_demo(out: str | Path, *, episodes: int = 150, val_episodes: int = 20, seed: int = 0,
               width: int = 640, height: int = 480) -> dict:
    """<out>/<SOURCE> for training and <out>/val/<SOURCE> with held-out episodes, for each style."""
    out = Path(out)
    written = {}
    for style in STYLES:
        written[style.name] = write_source(out / style.name, style, episodes, seed, width, height)
        if val_episodes:
            # Held-out episodes: other ids, so other layouts, never seen in training.
            written[f"val/{style.name}"] = write_source(out / "val" / style.name, style, val_episodes, seed,
                                                         width, height, first_id=1_000_000)
    return written
