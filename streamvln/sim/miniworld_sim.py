"""The MiniWorld backend: a scene spec rendered headless (EGL on Mesa), exact VLN actions, metrics, expert.

Several simulators may live in one process: MiniWorld compiles every scene into GL display list 1,
which pyglet shares between contexts, so a second environment would overwrite the first one's
scene. `_SceneEnv` compiles into a display list of its own (tested with two interleaved envs).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

import streamvln.sim  # noqa: F401  (sets PYGLET_HEADLESS before miniworld imports pyglet)

from . import expert
from .base import (FORWARD, LEFT, RIGHT, STOP, NavSimulator, Observation, SimConfig, SimulatorError, success_distance,
                   wrap)
from .episodes import NavEpisode
from .metrics import EpisodeMeasures
from .navgrid import NavGrid
from .tiers import build_scene
from .world import DOOR_HEIGHT, KINDS, WALL_HEIGHT, SceneError, SceneSpec


def _miniworld():
    """Import MiniWorld lazily: generating episodes or grids needs no GL at all."""
    from miniworld import entity, miniworld, params
    return miniworld, entity, params


def _load_texture(cls, tex_path):
    """MiniWorld's Texture.load with the PNG decoded by Pillow, straight into the RGBA layout GL takes.

    pyglet decodes PNGs in pure Python and swizzles rows with regular expressions: ~0.8 s per
    texture, 15 s for a scene's first load. Same pixels, same GL calls, ~100x faster.
    """
    import pyglet
    from pyglet import gl
    from PIL import Image

    with Image.open(tex_path) as im:
        # pyglet's image origin is the bottom-left corner
        im = im.convert("RGBA").transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        width, height, data = im.width, im.height, im.tobytes()
    img = pyglet.image.ImageData(width, height, "RGBA", data, pitch=width * 4)
    tex = img.get_texture()
    gl.glEnable(tex.target)
    gl.glBindTexture(tex.target, tex.id)
    gl.glTexImage2D(gl.GL_TEXTURE_2D, 0, gl.GL_RGB, width, height, 0, gl.GL_RGBA, gl.GL_UNSIGNED_BYTE, data)
    gl.glHint(gl.GL_GENERATE_MIPMAP_HINT, gl.GL_NICEST)
    gl.glGenerateMipmap(gl.GL_TEXTURE_2D)
    gl.glTexParameteri(gl.GL_TEXTURE_2D, gl.GL_TEXTURE_MAG_FILTER, gl.GL_LINEAR)
    gl.glTexParameteri(gl.GL_TEXTURE_2D, gl.GL_TEXTURE_MIN_FILTER, gl.GL_LINEAR_MIPMAP_LINEAR)
    gl.glBindTexture(gl.GL_TEXTURE_2D, 0)
    return tex


def _build_env_class(fast_textures: bool = True):
    mw, ent, params = _miniworld()
    from miniworld import opengl
    from pyglet import gl

    if fast_textures:
        opengl.Texture.load = classmethod(_load_texture)

    class StaticBox(ent.Box):
        @property
        def is_static(self):
            return True

    class SceneEnv(mw.MiniWorldEnv):
        """A MiniWorld environment that builds whatever SceneSpec is set before reset()."""

        def __init__(self, cfg: SimConfig):
            p = params.DEFAULT_PARAMS.no_random()
            p.set("forward_step", cfg.forward_step)
            p.set("forward_drift", 0.0)
            p.set("turn_step", cfg.turn_angle)
            p.set("cam_height", cfg.camera_height)
            p.set("cam_fwd_disp", 0.0)
            p.set("cam_pitch", 0.0)
            # MiniWorld takes the vertical field of view; Habitat's configs give the horizontal one
            fov_y = 2 * math.degrees(math.atan(math.tan(math.radians(cfg.hfov) / 2) * cfg.height / cfg.width))
            p.set("cam_fov_y", fov_y)
            self.spec: SceneSpec | None = None
            self._agent_radius = cfg.agent_radius
            self._list_id = None
            super().__init__(obs_width=cfg.width, obs_height=cfg.height, window_width=cfg.width,
                             window_height=cfg.height, params=p, domain_rand=False, max_episode_steps=10**9)

        def _gen_world(self):
            spec = self.spec or SceneSpec("empty", (_placeholder_room(),), (), ())
            rooms = [self.add_rect_room(r.min_x, r.max_x, r.min_z, r.max_z, wall_tex=r.wall_tex,
                                        floor_tex=r.floor_tex, ceil_tex="ceiling_tiles", wall_height=WALL_HEIGHT)
                     for r in spec.rooms]
            for d in spec.doors:
                extent = {"min_z": d.lo, "max_z": d.hi} if d.axis == "x" else {"min_x": d.lo, "max_x": d.hi}
                self.connect_rooms(rooms[d.a], rooms[d.b], max_y=DOOR_HEIGHT, **extent)
            for o in spec.objects:
                mesh, size, _, _ = KINDS[o.kind]
                if o.kind == "box":
                    e = StaticBox(o.colour, size)
                elif o.kind == "ball":
                    e = ent.MeshEnt(f"ball_{o.colour}", size, static=True)
                else:
                    e = ent.MeshEnt(mesh, size, static=True)
                self.place_entity(e, pos=np.array([o.x, 0.0, o.z]), dir=o.yaw)
            self.agent.radius = self._agent_radius
            r0 = spec.rooms[0]
            self.place_agent(pos=np.array([r0.centre[0], 0.0, r0.centre[1]]), dir=0.0)

        def _render_static(self):
            # A display list of our own instead of MiniWorld's fixed id 1 (see the module docstring).
            if self._list_id is None:
                self._list_id = gl.glGenLists(1)
            gl.glNewList(self._list_id, gl.GL_COMPILE)
            gl.glLightfv(gl.GL_LIGHT0, gl.GL_POSITION, (gl.GLfloat * 4)(*self.light_pos + [1]))
            gl.glLightfv(gl.GL_LIGHT0, gl.GL_AMBIENT, (gl.GLfloat * 4)(*self.light_ambient))
            gl.glLightfv(gl.GL_LIGHT0, gl.GL_DIFFUSE, (gl.GLfloat * 4)(*self.light_color))
            gl.glEnable(gl.GL_LIGHTING)
            gl.glEnable(gl.GL_LIGHT0)
            gl.glShadeModel(gl.GL_SMOOTH)
            gl.glEnable(gl.GL_COLOR_MATERIAL)
            gl.glColorMaterial(gl.GL_FRONT_AND_BACK, gl.GL_AMBIENT_AND_DIFFUSE)
            gl.glEnable(gl.GL_TEXTURE_2D)
            for room in self.rooms:
                room._render()
            for e in self.entities:
                if e.is_static:
                    e.render()
            gl.glEndList()

        def _render_world(self, frame_buffer, render_agent):
            gl.glCallList(self._list_id)
            for e in self.entities:
                if not e.is_static and e is not self.agent:
                    e.render()
            if render_agent:
                self.agent.render()
            return frame_buffer.resolve()

        def close(self):
            if self._list_id is not None:
                self.shadow_window.switch_to()
                gl.glDeleteLists(self._list_id, 1)
                self._list_id = None
            super().close()
            self.shadow_window.close()

    return SceneEnv


def _placeholder_room():
    from .world import Room
    return Room(-2.0, 2.0, -2.0, 2.0)


_ENV_CLASS = None


class MiniWorldSim(NavSimulator):
    def __init__(self, config: SimConfig | None = None, grid_cache: int = 4):
        global _ENV_CLASS
        self.config = config or SimConfig()
        self.config.validate()
        if _ENV_CLASS is None:
            _ENV_CLASS = _build_env_class()
        self._env = _ENV_CLASS(self.config)
        self._grids: OrderedDict[str, tuple[SceneSpec, NavGrid]] = OrderedDict()
        self._custom: dict[str, SceneSpec] = {}
        self._grid_cache = grid_cache
        self.episode: NavEpisode | None = None
        self.spec: SceneSpec | None = None
        self.grid: NavGrid | None = None
        self._measures: EpisodeMeasures | None = None
        self._steps = 0
        self._done = True

    # ---- scenes ---------------------------------------------------------------------------
    def register_scene(self, spec: SceneSpec) -> None:
        """Make a hand-built layout available under its scene_id (tests, custom worlds)."""
        spec.validate()
        self._custom[spec.scene_id] = spec
        self._grids.pop(spec.scene_id, None)
        if self.spec is not None and self.spec.scene_id == spec.scene_id:
            self.spec = None

    def scene(self, scene_id: str) -> tuple[SceneSpec, NavGrid]:
        if scene_id not in self._grids:
            try:
                spec = self._custom.get(scene_id) or build_scene(scene_id)
            except SceneError as e:
                raise SimulatorError(str(e), "unknown scene") from None
            self._grids[scene_id] = (spec, NavGrid(spec, self.config.agent_radius, self.config.grid_resolution,
                                                   self.config.grid_margin))
            if len(self._grids) > self._grid_cache:
                self._grids.popitem(last=False)
        self._grids.move_to_end(scene_id)
        return self._grids[scene_id]

    def load_scene(self, scene_id: str) -> None:
        spec, grid = self.scene(scene_id)
        if self.spec is None or self.spec.scene_id != scene_id:
            self._env.spec = spec
            self._env.reset()
        self.spec, self.grid = spec, grid

    # ---- episode --------------------------------------------------------------------------
    def reset(self, episode: NavEpisode) -> Observation:
        self.load_scene(episode.scene_id)
        where = f"episode {episode.episode_id} in {episode.scene_id}"
        sx, _, sz = episode.start_position
        if self.grid.collides(sx, sz):
            raise SimulatorError(f"{where}: start {episode.start_position} is inside an obstacle or outside the rooms",
                                 "start inside an obstacle")
        gx, _, gz = episode.goal_position
        if not self.grid.is_navigable(gx, gz):
            raise SimulatorError(f"{where}: goal {episode.goal_position} is outside the navigable space",
                                 "goal outside the navigable space")
        self.episode = episode
        self._steps, self._done = 0, False
        obs = self.teleport(episode.start_position, episode.start_heading)
        if not math.isfinite(self.geodesic(episode.start_position, episode.goal_position)):
            raise SimulatorError(f"{where}: goal {episode.goal_position} cannot be reached from the start",
                                 "goal unreachable")
        reference = [[p[0], p[1], p[2]] for p in episode.reference_path] or [episode.start_position,
                                                                             episode.goal_position]
        self._measures = EpisodeMeasures(lambda p: self.geodesic(p, episode.goal_position), obs.position,
                                         reference, success_distance(self.config, episode), self.config.forward_step)
        return obs

    def step(self, action: int) -> Observation:
        if self._done:
            raise RuntimeError("step() after the episode ended: call reset() first")
        action = int(action)
        if action not in (STOP, FORWARD, LEFT, RIGHT):
            raise ValueError(f"unknown action {action}; 0 STOP, 1 FORWARD, 2 LEFT, 3 RIGHT")
        collided = False
        if action == FORWARD:
            # MiniWorld refuses a step into a wall outright (Habitat would slide): a recorded collision
            collided = not self._env.move_agent(self.config.forward_step, 0.0)
        elif action in (LEFT, RIGHT):
            self._env.turn_agent(self.config.turn_angle if action == LEFT else -self.config.turn_angle)
        self._steps += 1
        obs = self._observe(collided)
        self._measures.update(obs.position, action, collided)
        self._done = action == STOP or self._steps >= self.config.max_steps
        return obs

    @property
    def done(self) -> bool:
        return self._done

    def metrics(self) -> dict:
        if self._measures is None:
            raise RuntimeError("metrics() before reset()")
        return self._measures.result()

    def agent_path(self) -> list[np.ndarray]:
        """The distinct positions of this episode so far (what path length and nDTW are measured on)."""
        return list(self._measures.positions) if self._measures else []

    def agent_pose(self) -> tuple[np.ndarray, float]:
        a = self._env.agent
        return np.array([float(a.pos[0]), 0.0, float(a.pos[2])]), wrap(float(a.dir) - math.pi / 2)

    def teleport(self, position, heading: float) -> Observation:
        a = self._env.agent
        a.pos = np.array([float(position[0]), 0.0, float(position[2])])
        a.dir = float(heading) + math.pi / 2  # MiniWorld's 0 faces +x, Habitat's faces -z
        return self._observe(False)

    def _observe(self, collided: bool) -> Observation:
        rgb = self._env.render_obs()
        pos, heading = self.agent_pose()
        return Observation(rgb=rgb, position=pos, heading=heading, step=self._steps, collided=collided)

    def render_top_view(self) -> np.ndarray:
        return self._env.render_top_view()

    def geodesic(self, a, b) -> float:
        return self.grid.geodesic((a[0], a[-1]), (b[0], b[-1]))

    def expert_action(self, goal, radius: float) -> int:
        pos, heading = self.agent_pose()
        return expert.next_action(self.grid, pos, heading, goal, radius, self.config.forward_step,
                                  self.config.turn_angle)

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None
