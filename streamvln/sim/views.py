"""What a pose sees: each object's bearing from the view's centre line, whether a nearer one hides it, and a
one-line description of the objects in view (the grounding questions and the describing expert share it)."""

from __future__ import annotations

import math

from .base import bearing, wrap
from .world import KINDS

DESCRIBE_AHEAD = 10.0  # degrees either side of the centre line that a description calls "ahead"


def extent(obj) -> float:
    """The object's visible half-width from above (a box's half-diagonal, a ball's radius), in metres."""
    size = KINDS[obj.kind][1]
    return size * math.sqrt(2) / 2 if obj.kind == "box" else size / 2


def blocked(agent, obj, others) -> bool:
    """Another object nearer than `obj` comes within both half-widths of the sight line to its centre, so it
    hides some or all of it (how much shows depends on heights)."""
    ax, az = agent
    dx, dz = obj.x - ax, obj.z - az
    length = math.hypot(dx, dz)
    for o in others:
        t = ((o.x - ax) * dx + (o.z - az) * dz) / (length * length)
        if 0 < t < 1 and math.hypot(ax + t * dx - o.x, az + t * dz - o.z) < extent(o) + extent(obj):
            return True
    return False


def relative_deg(agent, heading: float, obj) -> float:
    """The object's bearing from the view's centre line, degrees; positive: to the left."""
    return math.degrees(wrap(bearing(agent, (obj.x, obj.z)) - heading))


def hidden(agent, heading: float, obj, others, camera_height: float) -> bool:
    """A nearer object covers `obj`'s bearing and its top shows above `obj`'s top: in the image the nearer one
    stands in front of all of it. (`blocked` is the cautious test the grounding questions use: any overlap on
    the floor plan, even by an object beside the camera and outside the frame.)"""
    distance = math.hypot(obj.x - agent[0], obj.z - agent[1])
    rel = relative_deg(agent, heading, obj)
    for o in others:
        near = math.hypot(o.x - agent[0], o.z - agent[1])
        if near >= distance:
            continue
        covers = abs(relative_deg(agent, heading, o) - rel) < math.degrees(math.atan2(extent(o), near))
        # the camera looks down on both tops: the farther top shows above the nearer one unless it is lower
        if covers and (camera_height - KINDS[obj.kind][1]) / distance >= (camera_height - KINDS[o.kind][1]) / near:
            return True
    return False


def in_view(spec, agent, heading: float, hfov: float, ahead_deg: float, camera_height: float = 1.25) -> str:
    """Every object whose centre is in the frame and that no nearer object hides, left to right, each with its
    place ("ahead" within ahead_deg of the centre line, else "left" / "right"): "red ball left, blue box ahead."
    or "nothing.". Defined at every pose (no boundary is left out), so a walk can be described frame by frame."""
    seen = []
    for obj in spec.objects:
        rel = relative_deg(agent, heading, obj)
        others = [o for o in spec.objects if o is not obj]
        if abs(rel) <= hfov / 2 and not hidden(agent, heading, obj, others, camera_height):
            seen.append((-rel, f"{obj.name} {'ahead' if abs(rel) <= ahead_deg else 'left' if rel > 0 else 'right'}"))
    return ", ".join(text for _, text in sorted(seen)) + "." if seen else "nothing."
