"""Build dialogue: turn a chunk of navigation actions into the reference's multi-turn conversation."""

from __future__ import annotations

import random

from .frames import FORWARD, LEFT, RIGHT, STOP

IMAGE_TOKEN = "<image>"
MEMORY_TOKEN = "<memory>"

NAV_PROMPT = (
    "You are an autonomous navigation assistant. Your task is to <instruction>. Devise an action "
    "sequence to follow the instruction using the four actions: TURN LEFT (←) or TURN RIGHT (→) by 15 "
    "degrees, MOVE FORWARD (↑) by 25 centimeters, or STOP."
)
HISTORY_SUFFIX = f" These are your historical observations: {MEMORY_TOKEN}."
CONJUNCTIONS = (
    "you can see ",
    "in front of you is ",
    "there is ",
    "you can spot ",
    "you are toward the ",
    "ahead of you is ",
    "in your sight is ",
)
ACTION_SYMBOLS = {FORWARD: "↑", LEFT: "←", RIGHT: "→", STOP: "STOP"}


def nav_prompt(instruction: str, has_history: bool) -> str:
    """The first human prompt; the memory sentence is appended before the instruction is filled in."""
    prompt = NAV_PROMPT + (HISTORY_SUFFIX if has_history else "")
    return prompt.replace("<instruction>.", instruction)


def nav_dialogue(
    instruction: str, actions: list[int], *, has_history: bool, num_future_steps: int, rng: random.Random,
    descriptions: list[str] | None = None,
) -> list[tuple[str, str]]:
    """(role, content) turns: one human/assistant exchange per group of `num_future_steps` actions; with
    `descriptions` (one per turn, of the turn's frame) each answer says it before the actions."""
    prompt = nav_prompt(instruction, has_history)
    turns = []
    for n, j in enumerate(range(0, len(actions), num_future_steps)):
        observation = rng.choice(CONJUNCTIONS) + IMAGE_TOKEN + "."
        human = prompt + " " + observation if j == 0 else observation
        answer = "".join(ACTION_SYMBOLS[a] for a in actions[j : j + num_future_steps])
        if descriptions is not None:
            answer = f"In view: {descriptions[n]} {answer}"
        turns += [("user", human), ("assistant", answer)]
    return turns
