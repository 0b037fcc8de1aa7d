"""Tabletop: a pybullet Franka Panda, three coloured blocks and a tray; CALVIN-style actions, cameras, task checks.

Runs in pybullet's DIRECT mode with the TINY renderer: no display and no GL, so several tabletops
live in one process (each its own physics client). Actions are CALVIN's relative actions: the TCP
moves by a[:3] x 0.02 m and turns by a[3:6] x 0.05 rad (each clipped to [-1, 1]), a[6] > 0 opens the
gripper and otherwise closes it; observations carry CALVIN's robot_obs (15) and scene_obs (24) layouts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pybullet as pb
import pybullet_data

MAX_REL_POS, MAX_REL_ORN = 0.02, 0.05  # CALVIN's scaling of relative actions (robot.py)
COLORS = {"red": (0.85, 0.1, 0.1, 1), "blue": (0.1, 0.2, 0.85, 1), "green": (0.1, 0.7, 0.15, 1)}
BLOCK_HALF = 0.02  # 4 cm cubes
TRAY_HALF, TRAY_WALL = 0.08, 0.025  # inner half-width and wall height
HOME_JOINTS = (0.0, -0.3, 0.0, -2.2, 0.0, 2.0, 0.785)
DOWN = (math.pi, 0.0, 0.0)  # TCP pointing at the table
EE_LINK, FINGERS = 11, (9, 10)
SUBSTEPS = 8  # 240 Hz physics, 30 Hz control as CALVIN
BLOCK_X, BLOCK_Y = (0.38, 0.62), (-0.22, 0.12)  # where blocks start
TRAY_XY = (0.50, 0.26)
# each block has its own place in the tray, so a second block is not stacked on the first
TRAY_SLOTS = {"red": (-0.04, 0.035), "blue": (0.04, 0.035), "green": (0.0, -0.04)}


@dataclass
class TabletopConfig:
    static_size: int = 128  # CALVIN's static camera is 200x200; rendering cost grows with pixels
    gripper_size: int = 84  # CALVIN's gripper camera size
    blocks: tuple[str, ...] = tuple(COLORS)  # the blocks on the table (the ladder's bottom rung: red only)

    def __post_init__(self):
        self.blocks = tuple(self.blocks)
        if not self.blocks or len(set(self.blocks)) != len(self.blocks) or set(self.blocks) - set(COLORS):
            raise ValueError(f"blocks must be distinct colours of {tuple(COLORS)}, got {self.blocks}")


class Tabletop:
    """One scene; `reset(seed)` places the blocks, `step(action)` acts, `observe()` renders and reads state."""

    def __init__(self, cfg: TabletopConfig | None = None):
        self.cfg = cfg or TabletopConfig()
        self.client = pb.connect(pb.DIRECT)
        self.blocks: dict[str, int] = {}
        self._build()  # (reset builds it again)

    # ------------------------------------------------------------------ scene

    def _build(self):
        c = self.client
        pb.resetSimulation(physicsClientId=c)
        pb.setGravity(0, 0, -9.81, physicsClientId=c)
        pb.setAdditionalSearchPath(pybullet_data.getDataPath(), physicsClientId=c)
        self.plane = pb.loadURDF("plane.urdf", physicsClientId=c)
        pb.changeVisualShape(self.plane, -1, rgbaColor=(0.75, 0.68, 0.55, 1), physicsClientId=c)
        self.robot = pb.loadURDF("franka_panda/panda.urdf", [0, 0, 0], useFixedBase=True, physicsClientId=c)
        for finger in FINGERS:
            pb.changeDynamics(self.robot, finger, lateralFriction=2.0, physicsClientId=c)
        self.tray = self._make_tray()
        for name in self.cfg.blocks:
            rgba = COLORS[name]
            shape = pb.createCollisionShape(pb.GEOM_BOX, halfExtents=[BLOCK_HALF] * 3, physicsClientId=c)
            visual = pb.createVisualShape(pb.GEOM_BOX, halfExtents=[BLOCK_HALF] * 3, rgbaColor=rgba, physicsClientId=c)
            body = pb.createMultiBody(0.05, shape, visual, [0, 0, BLOCK_HALF], physicsClientId=c)
            pb.changeDynamics(body, -1, lateralFriction=1.5, physicsClientId=c)
            self.blocks[name] = body

    def _make_tray(self) -> int:
        """A floor and four walls as one static body."""
        c, h, t = self.client, TRAY_HALF, 0.005
        parts = [([h + t, h + t, t], [0, 0, t])]
        for sx, sy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            half = [t, h + t, TRAY_WALL / 2] if sx else [h + t, t, TRAY_WALL / 2]
            parts.append((half, [sx * (h + t), sy * (h + t), TRAY_WALL / 2]))
        halves, offsets = [p[0] for p in parts], [p[1] for p in parts]
        col = pb.createCollisionShapeArray([pb.GEOM_BOX] * 5, halfExtents=halves, collisionFramePositions=offsets,
                                           physicsClientId=c)
        vis = pb.createVisualShapeArray([pb.GEOM_BOX] * 5, halfExtents=halves, visualFramePositions=offsets,
                                        rgbaColors=[[0.35, 0.35, 0.38, 1]] * 5, physicsClientId=c)
        return pb.createMultiBody(0, col, vis, [*TRAY_XY, 0], physicsClientId=c)

    def reset(self, seed: int, render: bool = True) -> dict:
        """Blocks at seeded places (apart from each other), the arm at home with the gripper open.

        The world is rebuilt from nothing: pybullet keeps solver and contact state across a plain
        reset of poses, so an episode would otherwise depend on the episodes run before it in the
        same process (and synth's output on which worker ran what)."""
        rng = np.random.default_rng(seed)
        self._build()
        c = self.client
        for j, q in enumerate(HOME_JOINTS):
            pb.resetJointState(self.robot, j, q, physicsClientId=c)
        for f in FINGERS:
            pb.resetJointState(self.robot, f, 0.04, physicsClientId=c)
        placed: list[np.ndarray] = []
        for body in self.blocks.values():
            while True:
                xy = np.array([rng.uniform(*BLOCK_X), rng.uniform(*BLOCK_Y)])
                if all(np.linalg.norm(xy - p) > 0.09 for p in placed):
                    break
            placed.append(xy)
            yaw = rng.uniform(-0.3, 0.3)
            pb.resetBasePositionAndOrientation(body, [*xy, BLOCK_HALF], pb.getQuaternionFromEuler([0, 0, yaw]),
                                               physicsClientId=c)
            pb.resetBaseVelocity(body, [0, 0, 0], [0, 0, 0], physicsClientId=c)
        self.gripper_action = 1.0
        self._hold_joints()
        for _ in range(20):  # let the blocks settle
            pb.stepSimulation(physicsClientId=c)
        return self.observe(render)

    def close(self):
        if self.client is not None:
            pb.disconnect(self.client)
            self.client = None

    # ------------------------------------------------------------------ control

    def _hold_joints(self):
        c = self.client
        for j in range(7):
            q = pb.getJointState(self.robot, j, physicsClientId=c)[0]
            pb.setJointMotorControl2(self.robot, j, pb.POSITION_CONTROL, q, force=240, physicsClientId=c)
        self._set_gripper()

    def _set_gripper(self):
        width = 0.04 if self.gripper_action > 0 else 0.0
        for f in FINGERS:
            pb.setJointMotorControl2(self.robot, f, pb.POSITION_CONTROL, width, force=30, maxVelocity=0.2,
                                     physicsClientId=self.client)

    def tcp(self) -> tuple[np.ndarray, np.ndarray]:
        state = pb.getLinkState(self.robot, EE_LINK, computeForwardKinematics=True, physicsClientId=self.client)
        return np.array(state[4]), np.array(pb.getEulerFromQuaternion(state[5]))

    def step(self, action: np.ndarray) -> np.ndarray:
        """Apply one relative action (7,); returns the absolute action it commanded (CALVIN's `actions`)."""
        a = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        pos, euler = self.tcp()
        target_pos = pos + a[:3] * MAX_REL_POS
        target_pos[2] = max(target_pos[2], 0.005)  # never command the TCP into the table
        target_euler = euler + a[3:6] * MAX_REL_ORN
        self.gripper_action = 1.0 if a[6] > 0 else -1.0
        c = self.client
        joints = pb.calculateInverseKinematics(self.robot, EE_LINK, target_pos.tolist(),
                                               pb.getQuaternionFromEuler(target_euler.tolist()),
                                               maxNumIterations=40, residualThreshold=1e-4, physicsClientId=c)
        for j in range(7):
            pb.setJointMotorControl2(self.robot, j, pb.POSITION_CONTROL, joints[j], force=240, maxVelocity=2.0,
                                     physicsClientId=c)
        self._set_gripper()
        for _ in range(SUBSTEPS):
            pb.stepSimulation(physicsClientId=c)
        return np.array([*target_pos, *target_euler, self.gripper_action], dtype=np.float32)

    # ------------------------------------------------------------------ observation

    def block_pose(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        pos, orn = pb.getBasePositionAndOrientation(self.blocks[name], physicsClientId=self.client)
        return np.array(pos), np.array(pb.getEulerFromQuaternion(orn))

    def gripper_width(self) -> float:
        return float(sum(pb.getJointState(self.robot, f, physicsClientId=self.client)[0] for f in FINGERS))

    def robot_obs(self) -> np.ndarray:
        """CALVIN's 15: tcp xyz, tcp euler, gripper width, 7 arm joints, last gripper action."""
        pos, euler = self.tcp()
        joints = [pb.getJointState(self.robot, j, physicsClientId=self.client)[0] for j in range(7)]
        return np.array([*pos, *euler, self.gripper_width(), *joints, self.gripper_action], dtype=np.float32)

    def scene_obs(self) -> np.ndarray:
        """CALVIN's 24: six articulation states (none here: zeros), then each block's position and euler (zeros
        for a block the scene does not hold)."""
        poses = [np.concatenate(self.block_pose(n)) if n in self.blocks else np.zeros(6) for n in COLORS]
        return np.concatenate([np.zeros(6), *poses]).astype(np.float32)

    def render(self) -> tuple[np.ndarray, np.ndarray]:
        """The static camera (facing the robot over the table) and the camera on the hand, uint8 RGB."""
        c, s, g = self.client, self.cfg.static_size, self.cfg.gripper_size
        view = pb.computeViewMatrix([0.98, 0.02, 0.48], [0.45, 0.02, 0.0], [0, 0, 1])
        proj = pb.computeProjectionMatrixFOV(50, 1.0, 0.05, 3.0)
        static = pb.getCameraImage(s, s, view, proj, renderer=pb.ER_TINY_RENDERER, physicsClientId=c)[2]
        state = pb.getLinkState(self.robot, EE_LINK, computeForwardKinematics=True, physicsClientId=c)
        rot = np.array(pb.getMatrixFromQuaternion(state[5])).reshape(3, 3)
        # on the approach axis, 10 cm behind the fingers, looking along them: a block right below the grasp point is
        # in the middle of the picture at any height (5 cm off the axis, its place in the picture also moved with the
        # height, and a tiny policy could not learn the x offset: docs/manip.md)
        eye = np.array(state[4]) - rot[:, 2] * 0.10
        hand_view = pb.computeViewMatrix(eye.tolist(), (eye + rot[:, 2]).tolist(), rot[:, 0].tolist())
        hand_proj = pb.computeProjectionMatrixFOV(75, 1.0, 0.01, 2.0)
        hand = pb.getCameraImage(g, g, hand_view, hand_proj, renderer=pb.ER_TINY_RENDERER, physicsClientId=c)[2]
        return (np.asarray(static, np.uint8).reshape(s, s, 4)[..., :3].copy(),
                np.asarray(hand, np.uint8).reshape(g, g, 4)[..., :3].copy())

    def observe(self, render: bool = True) -> dict:
        obs = {"robot_obs": self.robot_obs(), "scene_obs": self.scene_obs()}
        if render:
            obs["rgb_static"], obs["rgb_gripper"] = self.render()
        return obs
