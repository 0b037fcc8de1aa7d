"""The locally built Qwen2 tokenizer and the reference's dialogue text, token ids and label rule."""

import random

import numpy as np
import pytest
from click.testing import CliRunner
from transformers import AutoTokenizer

from pipeline.cli import main
from pipeline.dialogue import CONJUNCTIONS, nav_dialogue, nav_prompt
from pipeline.qwen_tokenizer import load_tokenizer, tokenizer_fingerprint
from pipeline.tokens import tokenize_dialogue

REAL_QWEN2_IDS = {
    "\n": 198, "system": 8948, "user": 872, "assistant": 77091, "↑": 76286, "←": 71858, "→": 51018,
    "STOP": 50669, "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
}


@pytest.mark.parametrize("text,token_id", REAL_QWEN2_IDS.items())
def test_real_qwen2_ids(tok, text, token_id):
    assert tok(text, add_special_tokens=False)["input_ids"] == [token_id]


def test_tokenizer_dir_loads_with_plain_transformers(tokenizer_dir):
    plain = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    assert plain.pad_token == "<|endoftext|>" and plain.pad_token_id == 151643
    assert len(plain) == 151646
    # Qwen's well-known system prompt ids, and its chat template
    assert plain("You are a helpful assistant.")["input_ids"] == [2610, 525, 264, 10950, 17847, 13]
    text = plain.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"


def test_image_and_memory_are_added_as_single_special_tokens(tok):
    for special in ("<image>", "<memory>"):
        (token,) = tok(special, add_special_tokens=False)["input_ids"]
        assert token >= 151646


def test_fingerprint_is_stable_and_sensitive(tokenizer_dir, tok):
    again = load_tokenizer(tokenizer_dir)
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(tok)
    again.add_tokens(["<extra>"])
    assert tokenizer_fingerprint(again) != tokenizer_fingerprint(tok)


def test_hand_worked_dialogue_ids_and_labels(tok, token_ids):
    turns = [("user", "you can see <image>."), ("assistant", "↑←→↑"), ("user", "there is <image>."), ("assistant", "STOP")]
    input_ids, labels = tokenize_dialogue(tok, token_ids, turns)
    system = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]
    user1 = [151644, 872, 198, 9330, 646, 1490, 220, -200, 13, 151645, 198]
    bot1 = [151644, 77091, 198, 76286, 71858, 51018, 76286, 151645, 198]
    user2 = [151644, 872, 198, 18532, 374, 220, -200, 13, 151645, 198]
    bot2 = [151644, 77091, 198, 50669, 151645, 198]
    assert input_ids.dtype == np.int32 and labels.dtype == np.int32
    assert input_ids.tolist() == system + user1 + bot1 + user2 + bot2

    def masked(ids):  # system/user turns: only "\n", <|im_start|>, <|im_end|> keep their id
        return [t if t in (198, 151644, 151645) else -100 for t in ids]

    assert labels.tolist() == masked(system) + masked(user1) + bot1 + masked(user2) + bot2


def test_turns_are_tokenised_separately(tok, token_ids):
    # "↑STOP" and "↑↑STOP" pre-tokenise differently from the symbols one by one: only per-turn
    # tokenisation with the real tokenizer reproduces the reference's ids.
    input_ids, labels = tokenize_dialogue(tok, token_ids, [("user", "x <memory>. y"), ("assistant", "↑STOP")])
    assert input_ids.tolist()[11:] == [151644, 872, 198, 87, 220, -300, 13, 379, 151645, 198,
                                      151644, 77091, 198, 76286, 50669, 151645, 198]
    assert (labels[input_ids < 0] == -100).all()


def test_nav_dialogue_text():
    prompt = nav_prompt("Walk past the sofa.", has_history=False)
    assert prompt == (
        "You are an autonomous navigation assistant. Your task is to Walk past the sofa. Devise an action "
        "sequence to follow the instruction using the four actions: TURN LEFT (←) or TURN RIGHT (→) by 15 "
        "degrees, MOVE FORWARD (↑) by 25 centimeters, or STOP.")
    assert nav_prompt("Go.", has_history=True).endswith(
        "or STOP. These are your historical observations: <memory>.")
    turns = nav_dialogue("Go.", [1, 2, 3, 1, 1, 0], has_history=True, num_future_steps=4, rng=random.Random(7))
    rng = random.Random(7)
    c1, c2 = rng.choice(CONJUNCTIONS), rng.choice(CONJUNCTIONS)
    assert turns == [
        ("user", nav_prompt("Go.", True) + " " + c1 + "<image>."),
        ("assistant", "↑←→↑"),
        ("user", c2 + "<image>."),
        ("assistant", "↑STOP"),
    ]


@pytest.mark.slow
def test_tokenizer_command_builds_from_tiktoken(tmp_path, tokenizer_dir):
    tiktoken_file = tokenizer_dir.parent / "qwen.tiktoken"
    if not tiktoken_file.exists():
        pytest.fail(f"{tiktoken_file} missing: `make tokenizer` downloads it")
    result = CliRunner().invoke(main, ["tokenizer", "--tiktoken", str(tiktoken_file), "--out", str(tmp_path / "tok")])
    assert result.exit_code == 0, result.output
    built = load_tokenizer(tmp_path / "tok")
    assert tokenizer_fingerprint(built) == tokenizer_fingerprint(load_tokenizer(tokenizer_dir))
    bad = CliRunner().invoke(main, ["tokenizer", "--tiktoken", str(tmp_path / "none"), "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "dashscope" in bad.output
