"""The RL stage's config: every parameter of the guide (grpo-sft-hybrid.md), typed, loaded strictly from YAML."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import ConfigError, load_config

PHASES = ("phase1_stop", "phase2_progress")
DECAY_TYPES = ("linear", "cosine", "exponential")


@dataclass
class RLLora:
    r: int = 32
    alpha: int = 64
    dropout: float = 0.0  # the guide's 0.05 would make the first PPO ratio differ from 1 (docs/rl.md)
    # the language model's attention projections only; the guide's ["q_proj", "v_proj"] also hit SigLIP
    target_modules: str = r"model\.layers\.\d+\.self_attn\.(q|v)_proj"


@dataclass
class RLConfig:
    """Defaults: the guide's training script (train_hybrid.sh), with its bugs fixed (docs/rl.md)."""

    # ---- rewards
    phase: str = "phase1_stop"  # phase1_stop: progress sign + terminal; phase2_progress: metres of progress
    success_reward: float = 2.0
    progress_reward: float = 0.05  # phase1_stop: +this when the geodesic distance shrinks, -this otherwise
    collision_penalty: float = 0.1
    terminal_distance_scale: float = 6.0  # terminal -d / this
    spl_reward: float = 1.0  # x L_ref / max(L_ref, L_agent) on success
    reward_clip: float = 10.0  # terminal reward clipped to +-this
    # ---- hybrid SFT
    use_hybrid_training: bool = True
    sft_loss_start_weight: float = 1.0
    sft_loss_end_weight: float = 0.9
    sft_loss_decay_updates: int = 600
    sft_loss_decay_type: str = "cosine"
    sft_use_policy_steps: bool = True  # policy steps also get SFT on the expert's label in their state
    sft_oracle_only: bool = False  # only expert-driven steps (overrides sft_use_policy_steps)
    oracle_weight: float = 2.0  # expert-driven steps weigh this x the schedule's weight
    # ---- expert intervention
    enable_recovery: bool = True  # disable_recovery: --no-enable-recovery
    offtrack_dist_thresh: float = 3.0
    offtrack_heading_thresh_deg: float = 120.0
    offtrack_patience: int = 8
    heading_guard_dist: float = 3.0
    lookahead_k: int = 1
    recovery_dist_thresh: float = 2.0
    recovery_heading_thresh_deg: float = 45.0
    recovery_max_steps: int = 100
    waypoint_radius: float = 0.5  # the expert's follower radius toward a waypoint (B7: well below the switch)
    oracle_goal_radius: float = 1.0  # the expert says STOP within this of the goal (the guide's, B15: really used)
    goal_radius: float = 3.0
    goal_grace_steps: int = 7
    goal_stop_patience: int = 5  # 0: no forced STOP in the goal zone
    # beyond the guide (docs/rl.md, "Spinning"): this many consecutive policy steps outside the goal zone
    # without a new closest approach to the goal end the episode as a failure, charged stall_penalty more
    # than the terminal reward; 0: off, the guide's (a policy turning in place near its start is never
    # taken over and pays only the turn cost, so spinning out the step limit can beat trying to walk)
    stall_patience: int = 0
    stall_penalty: float = 0.0
    # beyond the guide: a refused (premature) STOP ends the episode as a failure charged this much more than the
    # terminal reward; 0: off, the guide's. With the stall option alone a far STOP is the cheap way out.
    premature_stop_penalty: float = 0.0
    # ---- optimisation
    num_updates: int = 500
    num_episodes_per_update: int = 1
    group_size: int = 2
    temperature: float = 0.5  # rollouts 1..G-1 sample at this temperature; rollout 0 is greedy
    learning_rate: float = 5e-7
    weight_decay: float = 0.01
    ppo_epochs: int = 1
    mini_batch_size: int = 2
    max_grad_norm: float = 0.5
    clip_eps: float = 0.2
    entropy_coef: float = 0.02
    advantage_std_floor: float = 0.5  # group std below this does not blow a small return gap up to +-1
    max_steps_per_episode: int = 300
    # PPO minibatches of whole windows (at least mini_batch_size decisions each): a window's decisions then
    # share one forward (logprob.chains), about window-length times less update compute; off: the guide's
    # minibatches of exactly mini_batch_size decisions drawn at random (docs/rl.md)
    window_minibatches: bool = False
    lora: RLLora | None = field(default_factory=RLLora)
    deepspeed: str | None = None  # a DeepSpeed JSON (configs/deepspeed/zero2.json); None: plain AdamW
    num_envs: int = 4  # environments stepped together (a group's rollouts run side by side)
    seed: int = 0
    save_every: int = 10
    keep_checkpoints: int = 2
    # ---- logging
    tensorboard: bool = True
    use_wandb: bool = False
    wandb_project: str = "streamvln-rl"
    wandb_run_name: str | None = None

    def validate(self):
        if self.phase not in PHASES:
            raise ConfigError(f"phase must be one of {PHASES}, got {self.phase!r}")
        if self.sft_loss_decay_type not in DECAY_TYPES:
            raise ConfigError(f"sft_loss_decay_type must be one of {DECAY_TYPES}, got {self.sft_loss_decay_type!r}")
        if self.sft_loss_decay_type == "exponential" and min(self.sft_loss_start_weight, self.sft_loss_end_weight) <= 0:
            raise ConfigError("exponential SFT decay needs start and end weights > 0 (the guide's formula is NaN "
                              "at the start when the end weight is 0): use linear or cosine")
        for name in ("num_updates", "num_episodes_per_update", "group_size", "ppo_epochs", "mini_batch_size",
                     "num_envs", "max_steps_per_episode", "offtrack_patience", "recovery_max_steps", "save_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.group_size == 1 and self.advantage_std_floor <= 0:
            # the guide's quick check runs groups of 1: every advantage is 0 (R - mean R), so only the SFT and
            # entropy terms move the policy; without the floor it would be 0 / 0
            raise ConfigError("group_size 1 needs advantage_std_floor > 0 (its advantages are 0 / std = 0 / 0)")
        if self.temperature <= 0:
            raise ConfigError("temperature must be positive")
        if self.stall_patience < 0 or self.stall_penalty < 0:
            raise ConfigError("stall_patience and stall_penalty must be >= 0 (0: off)")
        if self.premature_stop_penalty < 0:
            raise ConfigError("premature_stop_penalty must be >= 0 (0: off)")
        if self.stall_penalty > 0 and self.stall_patience == 0:
            raise ConfigError("stall_penalty needs stall_patience > 0: without it no episode ever stalls")
        if self.waypoint_radius >= self.offtrack_dist_thresh:
            raise ConfigError("waypoint_radius must be well below offtrack_dist_thresh (B7)")


def load_rl_config(path: str | Path | None, **overrides) -> RLConfig:
    return load_config(RLConfig, path, overrides)
