"""Turn tokens for the streaming agent, built with the navigation shards' own prompt and tokenisation.

A window opens with the system turn and the first user turn (instruction, the memory sentence when
there is history, one frame); later turns carry one frame each. Each turn ends with the assistant
header, after which the model writes its actions and <|im_end|>. Token for token this is the
sequence `tokenize_dialogue` builds for a training chunk (tested), where the reference instead ends
each turn with an empty assistant turn and lets the model write a second header.
"""

from __future__ import annotations

import re

import numpy as np

from pipeline.dialogue import HISTORY_SUFFIX, IMAGE_TOKEN, NAV_PROMPT
from pipeline.tokens import TokenIds, render_turn, tokenize_dialogue

STOP, FORWARD, LEFT, RIGHT = 0, 1, 2, 3
SYMBOLS = {"STOP": STOP, "↑": FORWARD, "←": LEFT, "→": RIGHT}
_ACTION_RE = re.compile("STOP|↑|←|→")
# The reference's eval writes the memory sentence without the colon training uses.
REFERENCE_HISTORY_SUFFIX = " These are your historical observations <memory>."


def parse_actions(text: str) -> list[int]:
    """Every action symbol in order (any count); nothing parsed means STOP, as the reference."""
    found = [SYMBOLS[m] for m in _ACTION_RE.findall(text)]
    return found or [STOP]


class TurnBuilder:
    def __init__(self, tok, reference_memory_text: bool = False):
        self.tok = tok
        self.ids = TokenIds.of(tok)
        self.history_suffix = REFERENCE_HISTORY_SUFFIX if reference_memory_text else HISTORY_SUFFIX
        self.header = self._encode("<|im_start|>assistant\n")
        self.newline = self._encode("\n")
        self.im_end = int(tok.convert_tokens_to_ids("<|im_end|>"))

    def _encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok(text, add_special_tokens=False)["input_ids"], np.int64)

    def open_window(self, instruction: str, has_memory: bool, conjunction: str) -> np.ndarray:
        """System turn + first user turn + assistant header; <image>/<memory> as -200/-300."""
        prompt = NAV_PROMPT + (self.history_suffix if has_memory else "")
        human = prompt.replace("<instruction>.", instruction) + " " + conjunction + IMAGE_TOKEN + "."
        ids, _ = tokenize_dialogue(self.tok, self.ids, [("user", human)])
        return np.concatenate([ids.astype(np.int64), self.header])

    def next_turn(self, conjunction: str) -> np.ndarray:
        """The newline closing the previous answer, the next user turn, the assistant header."""
        ids, _ = tokenize_dialogue(self.tok, self.ids, [("user", conjunction + IMAGE_TOKEN + ".")])
        system = len(self._encode(render_turn("system", "You are a helpful assistant.")))
        return np.concatenate([self.newline, ids[system:].astype(np.int64), self.header])

    def answer_ids(self, actions: list[int]) -> np.ndarray:
        """What a perfect model writes after the header (teacher forcing): the symbols and <|im_end|>."""
        inv = {v: k for k, v in SYMBOLS.items()}
        return np.concatenate([self._encode("".join(inv[a] for a in actions)), [self.im_end]])
