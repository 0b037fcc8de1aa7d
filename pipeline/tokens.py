"""Tokenise: render a conversation in Qwen2 chat format and build input_ids and labels as the reference."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .dialogue import IMAGE_TOKEN, MEMORY_TOKEN

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = -200
MEMORY_PLACEHOLDER = -300
SYSTEM_TURN = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


@dataclass(frozen=True)
class TokenIds:
    """The ids the label rule and placeholder swap need, read from the tokenizer (not hard-coded)."""

    image: int
    memory: int
    always_labelled: tuple[int, ...]  # "\n", <|im_start|>, <|im_end|>: kept in labels everywhere

    @classmethod
    def of(cls, tok) -> "TokenIds":
        ids = tok.convert_tokens_to_ids([IMAGE_TOKEN, MEMORY_TOKEN, "<|im_start|>", "<|im_end|>"])
        newline = tok("\n", add_special_tokens=False)["input_ids"]
        if len(newline) != 1 or None in ids or tok.unk_token_id in ids[2:]:
            raise ValueError("tokenizer lacks Qwen2's <|im_start|>/<|im_end|> or a single-token newline")
        return cls(image=ids[0], memory=ids[1], always_labelled=(newline[0], ids[2], ids[3]))


def render_turn(role: str, content: str) -> str:
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def tokenize_dialogue(tok, ids: TokenIds, turns: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and labels (int32) for a system turn followed by `turns`.

    Each turn is tokenised on its own and the lists are concatenated, as the reference does (this
    differs from tokenising the joined text at BPE boundaries). Labels: assistant turns keep their
    ids, system and user turns are -100 except the always-labelled ids ("\\n", <|im_start|>,
    <|im_end|>), which keep their id wherever they stand. <image>/<memory> become -200/-300.
    """
    texts = [SYSTEM_TURN] + [render_turn(role, content) for role, content in turns]
    roles = ["system"] + [role for role, _ in turns]
    encoded = tok(texts, add_special_tokens=False)["input_ids"]
    input_ids = np.fromiter((t for seq in encoded for t in seq), dtype=np.int64)
    is_assistant = np.concatenate([np.full(len(seq), role == "assistant") for seq, role in zip(encoded, roles)])
    keep = is_assistant | np.isin(input_ids, ids.always_labelled)
    labels = np.where(keep, input_ids, IGNORE_INDEX)
    input_ids[input_ids == ids.image] = IMAGE_PLACEHOLDER
    input_ids[input_ids == ids.memory] = MEMORY_PLACEHOLDER
    # A placeholder inside an assistant turn is not a target: the reference masks visual positions.
    labels[input_ids < 0] = IGNORE_INDEX
    return input_ids.astype(np.int32), labels.astype(np.int32)
