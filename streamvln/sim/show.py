"""Pictures of episodes: a top-down map (rooms, walls, objects, reference path, goal, walked path) beside the first-person view.

Drawn with OpenCV from the scene geometry, so the map needs no GL and its scale is exact; evaluation
reuses `top_down_map` for its per-episode maps.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from .episodes import NavEpisode
from .world import SceneSpec

FLOOR_BGR = {"floor_tiles_bw": (200, 200, 200), "wood": (120, 170, 215), "concrete_tiles": (170, 170, 160),
             "asphalt": (110, 110, 110), "grass": (120, 190, 120), "white": (235, 235, 235)}
OBJECT_BGR = {"red": (60, 60, 220), "green": (60, 180, 60), "blue": (220, 90, 40), "purple": (190, 60, 120),
              "yellow": (40, 220, 230), "grey": (128, 128, 128), None: (40, 90, 150)}


def top_down_map(spec: SceneSpec, episode: NavEpisode | None = None, agent_path=None, px_per_m: float = 32.0,
                 success_distance: float | None = None) -> np.ndarray:
    """BGR uint8 map; reference path green, walked path blue, goal red with the success circle (the goal's
    own radius unless `success_distance` is given)."""
    min_x, max_x, min_z, max_z = spec.bounds()
    pad = 1.0
    w = int(math.ceil((max_x - min_x + 2 * pad) * px_per_m))
    h = int(math.ceil((max_z - min_z + 2 * pad) * px_per_m))
    img = np.full((h, w, 3), 255, np.uint8)

    def px(x, z):
        return int(round((x - min_x + pad) * px_per_m)), int(round((z - min_z + pad) * px_per_m))

    for area in spec.areas:
        cv2.rectangle(img, px(area.min_x, area.min_z), px(area.max_x, area.max_z),
                      FLOOR_BGR.get(area.floor_tex, (210, 210, 210)), -1)
    for x0, z0, x1, z1 in spec.walls():
        cv2.line(img, px(x0, z0), px(x1, z1), (30, 30, 30), 3)
    for i, room in enumerate(spec.rooms):
        cv2.putText(img, room.name, px(room.min_x + 0.2, room.min_z + 0.5), cv2.FONT_HERSHEY_SIMPLEX,
                    0.4, (20, 20, 20), 1, cv2.LINE_AA)
    for o in spec.objects:
        cv2.circle(img, px(o.x, o.z), max(int(o.radius * px_per_m), 2), OBJECT_BGR.get(o.colour), -1)
        cv2.putText(img, o.name, px(o.x + o.radius, o.z), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
    if episode is not None:
        goal = episode.goal_position
        radius = success_distance or episode.goals[0].get("radius") or 3.0
        cv2.circle(img, px(goal[0], goal[2]), int(radius * px_per_m), (80, 80, 230), 1, cv2.LINE_AA)
        ref = np.array([px(p[0], p[2]) for p in episode.reference_path], np.int32)
        if len(ref) > 1:
            cv2.polylines(img, [ref], False, (40, 160, 40), 2, cv2.LINE_AA)
        for p in ref:
            cv2.circle(img, tuple(int(v) for v in p), 3, (40, 160, 40), -1)
        cv2.circle(img, px(goal[0], goal[2]), 6, (0, 0, 220), -1)
        s = episode.start_position
        hd = episode.start_heading
        tip = (s[0] - 0.6 * math.sin(hd), s[2] - 0.6 * math.cos(hd))
        cv2.arrowedLine(img, px(s[0], s[2]), px(*tip), (0, 120, 0), 2, cv2.LINE_AA, tipLength=0.4)
    if agent_path is not None and len(agent_path) > 1:
        pts = np.array([px(p[0], p[-1]) for p in agent_path], np.int32)
        cv2.polylines(img, [pts], False, (200, 80, 0), 2, cv2.LINE_AA)
    return img


def side_by_side(frame_rgb: np.ndarray, map_bgr: np.ndarray, caption: str = "") -> np.ndarray:
    """First-person frame (RGB) scaled to the map's height, beside it, with a caption strip below."""
    h = map_bgr.shape[0]
    scale = h / frame_rgb.shape[0]
    frame = cv2.resize(cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2BGR), (int(frame_rgb.shape[1] * scale), h),
                       interpolation=cv2.INTER_AREA)
    return with_caption(np.concatenate([frame, map_bgr], axis=1), caption)


def with_caption(img: np.ndarray, *paragraphs: str) -> np.ndarray:
    """The picture with a white strip below it holding the text, word-wrapped, one paragraph after another."""
    lines, width = [], max(img.shape[1] // 7, 20)
    for text in paragraphs:
        line = ""
        for word in text.split():
            if len(line) + len(word) + 1 > width:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        if line:
            lines.append(line)
    if not lines:
        return img
    strip = np.full((18 * len(lines) + 8, img.shape[1], 3), 255, np.uint8)
    for i, text in enumerate(lines):
        cv2.putText(strip, text, (6, 18 * (i + 1)), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([img, strip], axis=0)
