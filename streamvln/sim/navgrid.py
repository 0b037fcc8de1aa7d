"""Navigable space: an occupancy grid of a scene for the agent radius, geodesic distances, shortest paths.

Two radii matter. Collision (`collides`) is exact and matches MiniWorld's own test: a circle of the
agent radius against the wall segments and the objects' bounding circles. Planning uses the grid,
whose cells are free only with `margin` to spare, so a path followed with 15-degree turns keeps
clear of walls. Shortest paths are Dijkstra over the grid with 16 neighbours (scipy, one search
per goal, cached), then pulled taut along lines of sight over free cells, so geodesic distances are
lengths of taut polylines, not staircases. Free cells keep their centres clear by radius + margin,
so obstacles look up to half a cell diagonal (3.5 cm) fatter than they are: around a door jamb a
path comes out about 1% (5 cm in 5 m) longer than the exact geodesic (tested on hand-worked layouts).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
from scipy import ndimage
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import dijkstra

from .world import SceneSpec

# (drow, dcol) neighbours: 8 adjacent cells and the 8 knight moves; each lists the cells that must
# also be free so a move never cuts a corner.
_MOVES = []
for dr, dc in [(0, 1), (1, 0), (0, -1), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1),
               (1, 2), (2, 1), (-1, 2), (-2, 1), (1, -2), (2, -1), (-1, -2), (-2, -1)]:
    if abs(dr) + abs(dc) == 1:
        via = []
    elif abs(dr) == abs(dc):
        via = [(dr, 0), (0, dc)]
    elif abs(dc) == 2:
        via = [(0, dc // 2), (dr, dc // 2)]
    else:
        via = [(dr // 2, 0), (dr // 2, dc)]
    _MOVES.append((dr, dc, math.hypot(dr, dc), via))


class NavGrid:
    def __init__(self, spec: SceneSpec, agent_radius: float = 0.18, resolution: float = 0.05,
                 margin: float = 0.05, cache: int = 16):
        self.spec, self.radius, self.res, self.margin = spec, agent_radius, resolution, margin
        self.walls = spec.walls()
        self.obstacles = np.array([[o.x, o.z, o.radius] for o in spec.objects], np.float64).reshape(-1, 3)
        self.areas = np.array([[a.min_x, a.max_x, a.min_z, a.max_z] for a in spec.areas], np.float64)
        min_x, max_x, min_z, max_z = spec.bounds()
        self.origin = np.array([min_x - 0.5, min_z - 0.5])
        self.shape = (int(math.ceil((max_z - min_z + 1.0) / resolution)),
                      int(math.ceil((max_x - min_x + 1.0) / resolution)))
        zs = self.origin[1] + (np.arange(self.shape[0]) + 0.5) * resolution
        xs = self.origin[0] + (np.arange(self.shape[1]) + 0.5) * resolution
        gx, gz = np.meshgrid(xs, zs)
        self.free = self.clearance(gx, gz) >= agent_radius + margin
        # nearest free cell of every cell, for snapping points the way Habitat snaps to its navmesh
        _, self._nearest = ndimage.distance_transform_edt(~self.free, return_indices=True)
        self._graph = self._build_graph()
        self._fields: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._cache = cache

    # ---- exact geometry -------------------------------------------------------------------
    def clearance(self, x, z):
        """Distance from (x, z) to the nearest wall or object surface; -1 outside every room and hallway."""
        x, z = np.asarray(x, np.float64), np.asarray(z, np.float64)
        p = np.stack([x, z], -1)[..., None, :]
        a, b = self.walls[:, :2], self.walls[:, 2:]
        ab = b - a
        t = np.clip(((p - a) * ab).sum(-1) / (ab * ab).sum(-1), 0.0, 1.0)
        d = np.linalg.norm(p - (a + t[..., None] * ab), axis=-1).min(-1)
        if len(self.obstacles):
            do = np.linalg.norm(p - self.obstacles[:, :2], axis=-1) - self.obstacles[:, 2]
            d = np.minimum(d, do.min(-1))
        ar = self.areas
        # closed rectangles: the doorway line between two touching rooms belongs to both (points on a
        # wall are excluded by the wall distance anyway)
        inside = ((x[..., None] >= ar[:, 0]) & (x[..., None] <= ar[:, 1]) &
                  (z[..., None] >= ar[:, 2]) & (z[..., None] <= ar[:, 3])).any(-1)
        return np.where(inside, d, -1.0)

    def collides(self, x: float, z: float) -> bool:
        """Whether the agent standing at (x, z) overlaps a wall or an object (MiniWorld's rule: strict <)."""
        return bool(self.clearance(x, z) < self.radius)

    # ---- grid -----------------------------------------------------------------------------
    def cell(self, x: float, z: float) -> tuple[int, int]:
        c = int(math.floor((x - self.origin[0]) / self.res))
        r = int(math.floor((z - self.origin[1]) / self.res))
        return min(max(r, 0), self.shape[0] - 1), min(max(c, 0), self.shape[1] - 1)

    def point(self, r: int, c: int) -> tuple[float, float]:
        return float(self.origin[0] + (c + 0.5) * self.res), float(self.origin[1] + (r + 0.5) * self.res)

    def is_navigable(self, x: float, z: float) -> bool:
        return bool(self.free[self.cell(x, z)])

    def snap(self, x: float, z: float) -> tuple[int, int]:
        r, c = self.cell(x, z)
        return int(self._nearest[0][r, c]), int(self._nearest[1][r, c])

    def _build_graph(self) -> csr_matrix:
        rows, cols = self.shape
        idx = np.arange(rows * cols).reshape(rows, cols)
        src, dst, w = [], [], []
        for dr, dc, cost, via in _MOVES:
            r0, r1 = max(0, -dr), rows - max(0, dr)
            c0, c1 = max(0, -dc), cols - max(0, dc)
            ok = self.free[r0:r1, c0:c1] & self.free[r0 + dr:r1 + dr, c0 + dc:c1 + dc]
            for vr, vc in via:
                ok &= self.free[r0 + vr:r1 + vr, c0 + vc:c1 + vc]
            src.append(idx[r0:r1, c0:c1][ok])
            dst.append(idx[r0 + dr:r1 + dr, c0 + dc:c1 + dc][ok])
            w.append(np.full(int(ok.sum()), cost * self.res))
        n = rows * cols
        return csr_matrix((np.concatenate(w), (np.concatenate(src), np.concatenate(dst))), shape=(n, n))

    def _field(self, goal_cell: tuple[int, int]):
        """Grid distances and predecessors toward `goal_cell` (the graph is symmetric), LRU-cached."""
        key = goal_cell[0] * self.shape[1] + goal_cell[1]
        if key in self._fields:
            self._fields.move_to_end(key)
            return self._fields[key]
        dist, pred = dijkstra(self._graph, directed=True, indices=key, return_predecessors=True)
        self._fields[key] = (dist, pred)
        if len(self._fields) > self._cache:
            self._fields.popitem(last=False)
        return dist, pred

    def grid_distance(self, a, b) -> float:
        """Staircase (16-neighbour) distance; an upper bound of the geodesic, cheap once b's field exists."""
        ra, ca = self.snap(a[0], a[1])
        dist, _ = self._field(self.snap(b[0], b[1]))
        return float(dist[ra * self.shape[1] + ca])

    # ---- paths ----------------------------------------------------------------------------
    def path(self, a, b) -> list[tuple[float, float]] | None:
        """Shortest path from a to b as a taut polyline of (x, z), endpoints included; None if unreachable.

        Endpoints off the grid (inside the margin, or in an obstacle) are snapped to the nearest free
        cell first, as Habitat snaps points to its navmesh.
        """
        sa, sb = self.snap(a[0], a[1]), self.snap(b[0], b[1])
        dist, pred = self._field(sb)
        cols = self.shape[1]
        node = sa[0] * cols + sa[1]
        if not np.isfinite(dist[node]):
            return None
        cells = [node]
        while node != sb[0] * cols + sb[1]:
            node = int(pred[node])
            cells.append(node)
        pts = np.array([self.point(n // cols, n % cols) for n in cells])
        pts[0] = (a[0], a[1]) if self.free[sa] and self.cell(a[0], a[1]) == sa else pts[0]
        pts[-1] = (b[0], b[1]) if self.cell(b[0], b[1]) == sb else pts[-1]
        return self._pull(pts)

    def geodesic(self, a, b) -> float:
        """Geodesic distance in metres between two (x, z) points; inf when no path joins them."""
        pts = self.path(a, b)
        if pts is None:
            return math.inf
        return float(sum(math.dist(p, q) for p, q in zip(pts, pts[1:])))

    def visible(self, p, pts: np.ndarray) -> np.ndarray:
        """For each point of pts (m, 2), whether the straight segment from p stays on free cells."""
        d = pts - np.asarray(p)
        n = int(math.ceil(np.linalg.norm(d, axis=1).max(initial=0.0) / (self.res / 2))) + 2
        t = np.linspace(0.0, 1.0, n)[:, None, None]
        s = np.asarray(p) + t * d[None]
        c = np.clip(np.floor((s[..., 0] - self.origin[0]) / self.res).astype(int), 0, self.shape[1] - 1)
        r = np.clip(np.floor((s[..., 1] - self.origin[1]) / self.res).astype(int), 0, self.shape[0] - 1)
        return self.free[r, c].all(axis=0)

    def _pull(self, pts: np.ndarray) -> list[tuple[float, float]]:
        """Greedy string pulling: from each corner, jump to the last point seen before sight is lost."""
        if len(pts) <= 2:
            return [tuple(map(float, p)) for p in pts]
        # every other cell is plenty: consecutive cells are 5 cm apart
        keep = np.unique(np.r_[np.arange(0, len(pts), 2), len(pts) - 1])
        pts = pts[keep]
        out, i = [pts[0]], 0
        while i < len(pts) - 1:
            vis = self.visible(pts[i], pts[i + 1:])
            blocked = np.flatnonzero(~vis)
            j = len(pts) - 1 if len(blocked) == 0 else i + max(int(blocked[0]), 1)
            out.append(pts[j])
            i = j
        return [tuple(map(float, p)) for p in out]
