"""GRPO + SFT hybrid reinforcement learning with expert intervention (docs/rl.md)."""
