"""Build the Qwen2 tokenizer locally from `qwen.tiktoken`, and load any Qwen2 tokenizer directory."""

from __future__ import annotations

import hashlib
from pathlib import Path

from transformers import AutoTokenizer, Qwen2Tokenizer
from transformers.convert_slow_tokenizer import TikTokenConverter

from .dialogue import IMAGE_TOKEN, MEMORY_TOKEN

QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 151643, 151644, 151645
QWEN_BPE_RANKS = 151643

# Qwen2-Instruct's template: a default system turn, then <|im_start|>role\ncontent<|im_end|>\n.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_qwen2_tokenizer(tiktoken_file: str | Path, out_dir: str | Path) -> Path:
    """Write a transformers Qwen2 tokenizer directory equivalent to Qwen2's from its BPE ranks."""
    tiktoken_file = Path(tiktoken_file)
    if not tiktoken_file.is_file():
        raise FileNotFoundError(
            f"{tiktoken_file} not found: it ships inside the dashscope wheel (dashscope/resources/); "
            "`make build/qwen.tiktoken` extracts it"
        )
    vocab, merges = TikTokenConverter(str(tiktoken_file)).extract_vocab_merges_from_model(str(tiktoken_file))
    if len(vocab) != QWEN_BPE_RANKS:
        raise ValueError(f"{tiktoken_file} has {len(vocab)} ranks, Qwen2 has {QWEN_BPE_RANKS}")
    # The class's own __init__ sets Qwen2's NFC normaliser, split pattern and byte-level decoder and
    # adds <|endoftext|> first, so it takes id 151643 right after the ranks.
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        extra_special_tokens=list(QWEN_SPECIALS[1:]),
        model_max_length=32768,
        chat_template=CHAT_TEMPLATE,
    )
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIALS[1:])})
    ids = tok.convert_tokens_to_ids(list(QWEN_SPECIALS))
    if ids != [151643, 151644, 151645]:
        raise AssertionError(f"special token ids came out as {ids}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out_dir)
    return out_dir


def load_tokenizer(path: str | Path):
    """Load a local tokenizer directory (never a hub id) and add `<image>`/`<memory>` as specials."""
    path = Path(path)
    if not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a tokenizer directory (no tokenizer_config.json); build one with "
            "`streamvln-shards tokenizer --out DIR` or point at a checkpoint's directory"
        )
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    new = [t for t in (IMAGE_TOKEN, MEMORY_TOKEN) if t not in tok.get_vocab()]
    if new:
        tok.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    return tok


def tokenizer_fingerprint(tok) -> str:
    """sha256 of the serialised backend (vocabulary, merges, added tokens, normaliser, pre-tokeniser).

    Equal fingerprints tokenise identically."""
    return hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()


def tokenizer_info(tok) -> dict:
    """What a shard set records about its tokenizer: the loader needs the pad id, the model the size."""
    return {"fingerprint": tokenizer_fingerprint(tok), "pad_token_id": tok.pad_token_id, "vocab_size": len(tok)}
