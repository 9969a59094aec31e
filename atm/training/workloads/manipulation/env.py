"""A two-link planar arm in MuJoCo reaching a random target around a random circular obstacle.

Geometry after the authors' release: links 0.65 and 0.55 m, 0.08 s per control step, at most 120
steps, success radius 0.09 m. One change of scale: obstacles are placed beyond the upper arm's reach
(``ArmSpec.obstacle_beyond_upper_arm``), so only the forearm and hand can touch them. With the upper
arm able to touch them, PPO with the baseline recipe learned nothing in 300k steps (held-out safe
success <= 0.06), and a hand-written collision-avoiding controller got stuck in most medium and
hard scenes; collision still counts for either link.

The arm is driven by joint-velocity commands (MuJoCo velocity actuators). Collision is decided
geometrically: the clearance between each link (a capsule) and the obstacle disc. That agrees with
MuJoCo's contacts on nearly every step and has no contact-margin subtleties, so it is the source of
truth for ``collision`` and for the proximity term of the reward. Both collision and success are
checked at every physics sub-step, so a fast arm cannot pass through the obstacle (or the target)
between two control steps.

Reward per step (after the authors' release)::

    progress_scale * (previous distance - distance) + success_bonus * safe_success
    - collision_penalty * collision - 0.01 * |a|^2 - 0.05 * max(0, 0.08 - clearance) / 0.08

with clearance taken as 0 on the colliding step (the arm stops at the first sub-step in contact, a
few millimetres in), so the proximity term stays within [0, 0.05].

``progress_scale``, ``success_bonus`` and ``collision_penalty`` can be changed while training runs,
through :meth:`PlanarArmReachEnv.set_reward_weight` (reachable with ``VecEnv.env_method``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import gymnasium as gym
import mujoco
import numpy as np
from gymnasium import spaces

__all__ = [
    "ArmSpec",
    "Difficulty",
    "PlanarArmReachEnv",
    "REWARD_WEIGHT_NAMES",
    "Scene",
    "arm_clearance",
    "classify_scene",
    "direct_path_clearance",
    "forward_kinematics",
    "sample_scene",
    "scene_is_solvable",
]

REWARD_WEIGHT_NAMES = ("progress_scale", "success_bonus", "collision_penalty")
DEFAULT_REWARD_WEIGHTS = {"progress_scale": 3.0, "success_bonus": 5.0, "collision_penalty": 5.0}
ACTION_COST = 0.01
PROXIMITY_COST = 0.05
PROXIMITY_MARGIN = 0.08

# Direct-path clearance (hand's start-to-target segment to the obstacle's edge) splits the scenes:
# a blocked straight line is hard; a line that passes close to the obstacle is medium.
MEDIUM_CLEARANCE_BELOW = 0.15
_SAMPLED_CLEARANCE = {  # ranges the sampler draws from, inside each class
    "hard": (-1.0, -0.1),  # times the obstacle radius: the centre lies within 0.9 r of the line
    "medium": (0.0, MEDIUM_CLEARANCE_BELOW),
    "easy": (MEDIUM_CLEARANCE_BELOW, 0.35),
}


class Difficulty(str, Enum):
    EASY = "easy"
    MEDIUM = "medium"
    HARD = "hard"


@dataclass(frozen=True)
class ArmSpec:
    """The task's geometry and scale. Links after the authors' release (0.65 and 0.55 m, dt 0.08 s)."""

    link_lengths: tuple[float, float] = (0.65, 0.55)
    link_radius: float = 0.025
    dt: float = 0.08  # seconds per control step
    substeps: int = 8  # physics steps per control step; collision and success are checked at each
    max_joint_speed: float = 1.5  # rad/s commanded by |action| = 1
    elbow_limit: float = 2.8  # rad
    success_radius: float = 0.09
    obstacle_radius: tuple[float, float] = (0.08, 0.14)
    max_steps: int = 120
    min_start_distance: float = 0.45  # hand to target at reset
    target_radius: tuple[float, float] = (0.35, 1.1)  # target's distance from the base
    # Obstacles beyond the upper arm's reach: with link 1 able to touch them, PPO did not learn the
    # task within 300k steps (the whole arm must detour); the forearm and hand still must avoid them.
    obstacle_beyond_upper_arm: bool = True

    @property
    def reach(self) -> float:
        return self.link_lengths[0] + self.link_lengths[1]


@dataclass(frozen=True)
class Scene:
    """One episode's layout. ``q0`` is the arm's start (shoulder, elbow) in radians."""

    q0: tuple[float, float]
    target: tuple[float, float]
    obstacle_center: tuple[float, float]
    obstacle_radius: float
    difficulty: Difficulty = field(default=Difficulty.EASY)


# ---------------------------------------------------------------- pure geometry


def forward_kinematics(q: np.ndarray, spec: ArmSpec) -> tuple[np.ndarray, np.ndarray]:
    """Elbow and hand positions for joint angles ``q`` of shape (..., 2); each result is (..., 2)."""
    q = np.asarray(q, dtype=np.float64)
    l1, l2 = spec.link_lengths
    a1 = q[..., 0]
    a12 = a1 + q[..., 1]
    elbow = np.stack([l1 * np.cos(a1), l1 * np.sin(a1)], axis=-1)
    hand = elbow + np.stack([l2 * np.cos(a12), l2 * np.sin(a12)], axis=-1)
    return elbow, hand


def _segment_point_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance from point(s) ``p`` to segment(s) ``a``-``b``; arrays broadcast over leading axes."""
    ab = b - a
    ap = p - a
    denom = np.maximum(np.sum(ab * ab, axis=-1), 1e-12)
    t = np.clip(np.sum(ap * ab, axis=-1) / denom, 0.0, 1.0)
    closest = a + t[..., None] * ab
    return np.linalg.norm(p - closest, axis=-1)


def arm_clearance(q: np.ndarray, center: np.ndarray, radius: float, spec: ArmSpec) -> np.ndarray:
    """Smallest gap between either link's surface and the obstacle's edge; <= 0 means contact."""
    elbow, hand = forward_kinematics(q, spec)
    center = np.asarray(center, dtype=np.float64)
    base = np.zeros_like(elbow)
    d1 = _segment_point_distance(center, base, elbow)
    d2 = _segment_point_distance(center, elbow, hand)
    return np.minimum(d1, d2) - radius - spec.link_radius


def _arm_clearance_scalar(q1: float, q2: float, cx: float, cy: float, radius: float, spec: ArmSpec) -> float:
    """Same as :func:`arm_clearance` for one configuration, in plain floats (the env's hot path)."""
    l1, l2 = spec.link_lengths
    ex, ey = l1 * math.cos(q1), l1 * math.sin(q1)
    hx, hy = ex + l2 * math.cos(q1 + q2), ey + l2 * math.sin(q1 + q2)
    d1 = _seg_dist(cx, cy, 0.0, 0.0, ex, ey)
    d2 = _seg_dist(cx, cy, ex, ey, hx, hy)
    return min(d1, d2) - radius - spec.link_radius


def _seg_dist(px: float, py: float, ax: float, ay: float, bx: float, by: float) -> float:
    abx, aby = bx - ax, by - ay
    t = ((px - ax) * abx + (py - ay) * aby) / max(abx * abx + aby * aby, 1e-12)
    t = 0.0 if t < 0.0 else 1.0 if t > 1.0 else t
    return math.hypot(px - (ax + t * abx), py - (ay + t * aby))


def _damped_least_squares(
    j11: float, j12: float, j21: float, j22: float, ex: float, ey: float, damping: float = 0.05
) -> tuple[float, float]:
    """Joint step ``J^T (J J^T + d^2 I)^-1 e`` for a hand error ``e``, clipped to [-1, 1] per joint."""
    a11 = j11 * j11 + j12 * j12 + damping**2
    a12 = j11 * j21 + j12 * j22
    a22 = j21 * j21 + j22 * j22 + damping**2
    det = a11 * a22 - a12 * a12
    ux = (a22 * ex - a12 * ey) / det
    uy = (a11 * ey - a12 * ex) / det
    dq1 = j11 * ux + j21 * uy
    dq2 = j12 * ux + j22 * uy
    return max(-1.0, min(1.0, dq1)), max(-1.0, min(1.0, dq2))


def direct_path_clearance(hand: np.ndarray, target: np.ndarray, center: np.ndarray, radius: float) -> float:
    """Gap between the straight hand-to-target segment and the obstacle's edge (negative: blocked)."""
    return float(
        _segment_point_distance(
            np.asarray(center, float), np.asarray(hand, float), np.asarray(target, float)
        )
        - radius
    )


def classify_scene(direct_clearance: float) -> Difficulty:
    """Hard when the straight path is blocked, medium when it passes within 0.15 m, else easy."""
    if direct_clearance < 0.0:
        return Difficulty.HARD
    if direct_clearance < MEDIUM_CLEARANCE_BELOW:
        return Difficulty.MEDIUM
    return Difficulty.EASY


class _CSpaceGrid:
    """Hand and elbow positions on a fixed joint-space grid, for the solvability check."""

    def __init__(self, spec: ArmSpec, n_shoulder: int = 90, n_elbow: int = 64) -> None:
        self.q1 = np.linspace(-math.pi, math.pi, n_shoulder, endpoint=False)
        self.q2 = np.linspace(-spec.elbow_limit, spec.elbow_limit, n_elbow)
        grid = np.stack(np.meshgrid(self.q1, self.q2, indexing="ij"), axis=-1)
        self.elbow, self.hand = forward_kinematics(grid, spec)

    def index(self, q: tuple[float, float]) -> tuple[int, int]:
        step1 = self.q1[1] - self.q1[0]
        i = int(round((math.remainder(q[0], 2 * math.pi) + math.pi) / step1)) % len(self.q1)
        j = int(np.argmin(np.abs(self.q2 - q[1])))
        return i, j


_GRIDS: dict[ArmSpec, _CSpaceGrid] = {}


def scene_is_solvable(scene: Scene, spec: ArmSpec, margin: float = 0.01) -> bool:
    """Whether a collision-free joint-space path joins the start to a configuration at the target.

    Flood fill on a 90 x 64 joint grid (4 degrees by 5 degrees), shoulder angle wrapping around.
    Cells count as free with ``margin`` to spare, so a thin gap at grid resolution is not trusted.
    """
    grid = _GRIDS.get(spec)
    if grid is None:
        grid = _GRIDS.setdefault(spec, _CSpaceGrid(spec))
    center = np.asarray(scene.obstacle_center, float)
    base = np.zeros_like(grid.elbow)
    gap = (
        np.minimum(
            _segment_point_distance(center, base, grid.elbow),
            _segment_point_distance(center, grid.elbow, grid.hand),
        )
        - scene.obstacle_radius
        - spec.link_radius
    )
    free = gap > margin
    goal = free & (np.linalg.norm(grid.hand - np.asarray(scene.target, float), axis=-1) < spec.success_radius)
    if not goal.any():
        return False
    i, j = grid.index(scene.q0)
    if not free[i, j]:
        return False
    # Flood fill by runs: each pass spreads the reached set over whole free runs along the elbow
    # axis, then along the (wrapping) shoulder axis. A pass per turn of the path, not per cell.
    runs_elbow = _free_runs(free, wrap=False)
    runs_shoulder = _free_runs(free.T, wrap=True).T
    reached = np.zeros_like(free)
    reached[i, j] = True
    count = 1
    while True:
        for runs in (runs_elbow, runs_shoulder):
            hit = np.bincount(runs.ravel(), weights=reached.ravel(), minlength=int(runs.max()) + 1) > 0
            hit[0] = False  # run id 0 marks blocked cells
            reached = hit[runs]
        if (reached & goal).any():
            return True
        new_count = int(reached.sum())
        if new_count == count:
            return False
        count = new_count


def _free_runs(free: np.ndarray, wrap: bool) -> np.ndarray:
    """Label maximal runs of True along the last axis (ids from 1; 0 where blocked).

    With ``wrap``, a run touching both ends of a row is one run (the shoulder angle wraps around).
    """
    rows, cols = free.shape
    previous = np.zeros_like(free)
    previous[:, 1:] = free[:, :-1]
    ids = np.cumsum((free & ~previous).ravel()).reshape(rows, cols) * free
    if wrap:
        joined = free[:, 0] & free[:, -1]
        mapping = np.arange(int(ids.max()) + 1)
        mapping[ids[joined, -1]] = ids[joined, 0]
        ids = mapping[ids]
    return ids


def sample_scene(
    rng: np.random.Generator, spec: ArmSpec, difficulty: Difficulty | str | None = None
) -> Scene:
    """Draw a solvable scene of the given difficulty (uniform over the three when None).

    The obstacle is placed beside the hand's straight path to the target at an offset drawn from the
    difficulty's clearance range; the scene is then classified by :func:`classify_scene` and kept only
    if it matches, the start pose is clear of the obstacle by 0.05 m, and :func:`scene_is_solvable`.
    """
    # Draw the class once, before rejection sampling: re-drawing it after each rejection would
    # favour the classes that are rejected least.
    if difficulty is None:
        difficulty = rng.choice([d.value for d in Difficulty])
    level = Difficulty(difficulty)
    for _ in range(1000):
        q0 = (float(rng.uniform(-math.pi, math.pi)), float(rng.uniform(-2.4, 2.4)))
        _, hand = forward_kinematics(np.array(q0), spec)
        rho = rng.uniform(*spec.target_radius)
        phi = rng.uniform(-math.pi, math.pi)
        target = np.array([rho * math.cos(phi), rho * math.sin(phi)])
        path = target - hand
        length = float(np.linalg.norm(path))
        if length < spec.min_start_distance:
            continue
        radius = float(rng.uniform(*spec.obstacle_radius))
        low, high = _SAMPLED_CLEARANCE[level.value]
        if level is Difficulty.HARD:
            low, high = low * radius, high * radius
        gap = rng.uniform(low, high)
        normal = np.array([-path[1], path[0]]) / length * rng.choice([-1.0, 1.0])
        center = hand + rng.uniform(0.3, 0.7) * path + normal * (radius + gap)
        if np.linalg.norm(center) < radius + 0.15:  # an obstacle on the shoulder blocks every path
            continue
        if spec.obstacle_beyond_upper_arm and (
            np.linalg.norm(center) - radius - spec.link_radius < spec.link_lengths[0] + 0.02
        ):
            continue
        if np.linalg.norm(center - target) < radius + spec.success_radius + 0.03:
            continue
        if classify_scene(direct_path_clearance(hand, target, center, radius)) is not level:
            continue
        if float(arm_clearance(np.array(q0), center, radius, spec)) < 0.05:
            continue
        scene = Scene(
            q0, (float(target[0]), float(target[1])), (float(center[0]), float(center[1])), radius, level
        )
        if scene_is_solvable(scene, spec):
            return scene
    raise RuntimeError(f"could not sample a solvable {level.value} scene for {spec}; widen the spec's ranges")


# ---------------------------------------------------------------- MuJoCo model


def _mjcf(spec: ArmSpec) -> str:
    l1, l2 = spec.link_lengths
    r = spec.link_radius
    timestep = spec.dt / spec.substeps
    # Velocity actuators with the implicit integrator track the commanded joint speed within a
    # sub-step or two (kv is integrated implicitly, so a stiff gain stays stable). No contacts:
    # clearance is computed geometrically.
    return f"""
<mujoco model="planar_arm_reach">
  <compiler angle="radian"/>
  <option timestep="{timestep}" gravity="0 0 0" integrator="implicitfast"/>
  <default>
    <geom contype="0" conaffinity="0" rgba="0.7 0.7 0 1"/>
    <joint damping="0.05" armature="0.01"/>
  </default>
  <worldbody>
    <geom name="ground" type="plane" size="1.5 1.5 0.1" rgba="0.9 0.9 0.9 1"/>
    <body name="link1" pos="0 0 0.05">
      <joint name="shoulder" type="hinge" axis="0 0 1"/>
      <geom name="link1" type="capsule" fromto="0 0 0 {l1} 0 0" size="{r}" mass="0.5"/>
      <body name="link2" pos="{l1} 0 0">
        <joint name="elbow" type="hinge" axis="0 0 1" limited="true"
               range="{-spec.elbow_limit} {spec.elbow_limit}"/>
        <geom name="link2" type="capsule" fromto="0 0 0 {l2} 0 0" size="{r}" mass="0.4"/>
        <site name="hand" pos="{l2} 0 0" size="0.02"/>
      </body>
    </body>
    <body name="target" mocap="true" pos="0 0 0.05">
      <geom name="target" type="sphere" size="{spec.success_radius}" rgba="0.2 0.8 0.2 0.4"/>
    </body>
    <body name="obstacle" mocap="true" pos="0 0 0.05">
      <geom name="obstacle" type="cylinder" size="0.1 0.05" rgba="0.8 0.2 0.2 1"/>
    </body>
  </worldbody>
  <actuator>
    <velocity name="shoulder_speed" joint="shoulder" kv="40" ctrllimited="true"
              ctrlrange="{-spec.max_joint_speed} {spec.max_joint_speed}"/>
    <velocity name="elbow_speed" joint="elbow" kv="40" ctrllimited="true"
              ctrlrange="{-spec.max_joint_speed} {spec.max_joint_speed}"/>
  </actuator>
</mujoco>
"""


# ---------------------------------------------------------------- the environment


class PlanarArmReachEnv(gym.Env[np.ndarray, np.ndarray]):
    """Reach a random target around a random circular obstacle; touching the obstacle ends the episode.

    Actions: two joint velocities in [-1, 1] (scaled by ``spec.max_joint_speed``). Observation (26):
    cos/sin of both joints, joint speeds, hand position, target and obstacle relative to the hand,
    obstacle relative to the elbow, obstacle radius, current clearance, distance, target, obstacle
    position, the elapsed fraction of the episode, the damped least-squares joint step toward the
    target and the joint-space gradient of the clearance.

    ``reset(options=...)`` takes ``{"difficulty": "easy"|"medium"|"hard"}`` to draw a scene of that
    class, or ``{"scene": Scene(...)}`` to place one by hand. The info dict carries ``safe_success``,
    ``collision``, ``final_distance`` (the current distance; final at the episode's end),
    ``scene_difficulty``, ``clearance`` and ``is_success`` (= ``safe_success``, for SB3).
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, spec: ArmSpec | None = None, reward_weights: dict[str, float] | None = None) -> None:
        self.arm = spec or ArmSpec()
        self._weights = dict(DEFAULT_REWARD_WEIGHTS)
        for name, value in (reward_weights or {}).items():
            self.set_reward_weight(name, value)
        self.model = mujoco.MjModel.from_xml_string(_mjcf(self.arm))
        self.data = mujoco.MjData(self.model)
        self._target_mocap = self.model.body("target").mocapid[0]
        self._obstacle_mocap = self.model.body("obstacle").mocapid[0]
        self._obstacle_geom = self.model.geom("obstacle").id
        self.action_space = spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(26,), dtype=np.float32)
        self.scene: Scene | None = None
        self._steps = 0
        self._distance = 0.0
        self._clearance = 0.0

    # -- reward weights, changeable while training runs

    def set_reward_weight(self, name: str, value: float) -> None:
        """Set one reward weight (``progress_scale``, ``success_bonus`` or ``collision_penalty``)."""
        if name not in REWARD_WEIGHT_NAMES:
            raise KeyError(
                f"unknown reward weight {name!r}; expected one of {', '.join(REWARD_WEIGHT_NAMES)}"
            )
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"reward weight {name} must be a finite number, got {value!r}")
        self._weights[name] = value

    def get_reward_weights(self) -> dict[str, float]:
        return dict(self._weights)

    # -- gymnasium API

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        options = options or {}
        scene = options.get("scene")
        if scene is None:
            scene = sample_scene(self.np_random, self.arm, options.get("difficulty"))
        self.scene = scene
        mujoco.mj_resetData(self.model, self.data)
        self.data.qpos[:] = scene.q0
        self.data.mocap_pos[self._target_mocap, :2] = scene.target
        self.data.mocap_pos[self._obstacle_mocap, :2] = scene.obstacle_center
        self.model.geom_size[self._obstacle_geom, 0] = scene.obstacle_radius
        mujoco.mj_forward(self.model, self.data)
        self._steps = 0
        q1, q2 = float(self.data.qpos[0]), float(self.data.qpos[1])
        self._distance = self._hand_distance(q1, q2)
        self._clearance = self._clearance_at(q1, q2)
        return self._observation(), self._info(False, False)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self.scene is None:
            raise RuntimeError("call reset() before step()")
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(2), -1.0, 1.0)
        self.data.ctrl[:] = a * self.arm.max_joint_speed
        previous = self._distance
        collision = success = False
        for _ in range(self.arm.substeps):
            mujoco.mj_step(self.model, self.data)
            q1, q2 = float(self.data.qpos[0]), float(self.data.qpos[1])
            self._clearance = self._clearance_at(q1, q2)
            self._distance = self._hand_distance(q1, q2)
            if self._clearance <= 0.0:
                collision = True
                break
            if self._distance <= self.arm.success_radius:
                success = True
                break
        self._steps += 1
        w = self._weights
        reward = (
            w["progress_scale"] * (previous - self._distance)
            + w["success_bonus"] * success
            - w["collision_penalty"] * collision
            - ACTION_COST * float(a @ a)
            # Saturates at contact (clearance 0): the collision penalty prices the contact itself.
            - PROXIMITY_COST * min(1.0, max(0.0, PROXIMITY_MARGIN - self._clearance) / PROXIMITY_MARGIN)
        )
        terminated = collision or success
        truncated = not terminated and self._steps >= self.arm.max_steps
        return self._observation(), float(reward), terminated, truncated, self._info(success, collision)

    # -- internals

    def _hand_distance(self, q1: float, q2: float) -> float:
        l1, l2 = self.arm.link_lengths
        hx = l1 * math.cos(q1) + l2 * math.cos(q1 + q2)
        hy = l1 * math.sin(q1) + l2 * math.sin(q1 + q2)
        assert self.scene is not None
        return math.hypot(hx - self.scene.target[0], hy - self.scene.target[1])

    def _clearance_at(self, q1: float, q2: float) -> float:
        assert self.scene is not None
        cx, cy = self.scene.obstacle_center
        return _arm_clearance_scalar(q1, q2, cx, cy, self.scene.obstacle_radius, self.arm)

    def _observation(self) -> np.ndarray:
        assert self.scene is not None
        q1, q2 = float(self.data.qpos[0]), float(self.data.qpos[1])
        l1, l2 = self.arm.link_lengths
        c1, s1, c12, s12 = math.cos(q1), math.sin(q1), math.cos(q1 + q2), math.sin(q1 + q2)
        ex, ey = l1 * c1, l1 * s1
        hx, hy = ex + l2 * c12, ey + l2 * s12
        tx, ty = self.scene.target
        ox, oy = self.scene.obstacle_center
        # Joint-space hints, so that the policy need not learn the arm's inverse kinematics from
        # scratch: the damped least-squares joint step that moves the hand straight to the target,
        # and the gradient of the obstacle clearance with respect to the joints.
        j11, j12, j21, j22 = -l1 * s1 - l2 * s12, -l2 * s12, l1 * c1 + l2 * c12, l2 * c12
        goal_step = _damped_least_squares(j11, j12, j21, j22, tx - hx, ty - hy)
        eps = 1e-3
        grad1 = (self._clearance_at(q1 + eps, q2) - self._clearance_at(q1 - eps, q2)) / (2 * eps)
        grad2 = (self._clearance_at(q1, q2 + eps) - self._clearance_at(q1, q2 - eps)) / (2 * eps)
        s = 1.0 / self.arm.reach  # positions in units of the arm's reach
        v = self.data.qvel / self.arm.max_joint_speed
        return np.array(
            [
                c1, s1, math.cos(q2), math.sin(q2),
                v[0], v[1],
                hx * s, hy * s,
                (tx - hx) * s, (ty - hy) * s,
                (ox - hx) * s, (oy - hy) * s,
                (ox - ex) * s, (oy - ey) * s,
                self.scene.obstacle_radius * 5.0,
                min(self._clearance, 0.5) * 4.0,
                self._distance * s,
                tx * s, ty * s,
                ox * s, oy * s,
                self._steps / self.arm.max_steps,
                goal_step[0], goal_step[1],
                grad1, grad2,
            ],
            dtype=np.float32,
        )

    def _info(self, success: bool, collision: bool) -> dict[str, Any]:
        assert self.scene is not None
        return {
            "safe_success": bool(success and not collision),
            "is_success": bool(success and not collision),  # SB3 reports it as rollout/success_rate
            "collision": bool(collision),
            "final_distance": self._distance,
            "scene_difficulty": self.scene.difficulty.value,
            "clearance": self._clearance,
        }
