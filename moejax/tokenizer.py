"""Text <-> token ids with a checkpoint's own tokenizer: its `tokenizer.json` (the Hugging Face `tokenizers` format).

Read from the checkpoint directory only, never downloaded. A model built from a config (random weights) has
none. Encoding adds the special tokens the file's post-processor defines (a BOS token, as Hugging Face's
`tokenizer(text)` does); decoding drops them.
"""

from __future__ import annotations

from pathlib import Path

TOKENIZER_FILE = "tokenizer.json"
# The text-side files of a Hugging Face checkpoint, which `moejax convert` copies beside the weights.
TEXT_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
              "generation_config.json", "chat_template.json", "chat_template.jinja", "tokenizer.model", "vocab.json",
              "merges.txt", "vocab.txt")


def text_files(path: str | Path) -> list[Path]:
    """The files of `TEXT_FILES` present in checkpoint directory `path`, in that order."""
    return [Path(path) / name for name in TEXT_FILES if (Path(path) / name).is_file()]


def load_tokenizer(path: str | Path):
    """The `tokenizers.Tokenizer` in checkpoint directory `path`, or None when it has no tokenizer.json.

    Raises ValueError naming the file when it exists but cannot be read as a tokenizer.
    """
    file = Path(path) / TOKENIZER_FILE
    if not file.exists():
        return None
    if not file.is_file():
        raise ValueError(f"{file}: not a file (a tokenizer.json is a Hugging Face `tokenizers` JSON file)")
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises its own exception types (and plain Exception) for a bad file
        raise ValueError(f"{file}: not a readable tokenizer file: {' '.join(str(err).split())}") from err


def encode(tokenizer, text: str) -> list[int]:
    """The ids of `text`. Raises ValueError for a text that is empty or only whitespace (it would encode to the
    special tokens alone, or to nothing) and for one the tokenizer fails on."""
    if not text.strip():
        raise ValueError(f"text prompt {text!r} is empty or only whitespace; give some text (or --prompt-ids)")
    try:
        return tokenizer.encode(text).ids
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # noqa: BLE001 - a failure inside tokenizers' Rust code is a pyo3 PanicException
        raise ValueError(f"the tokenizer cannot encode text prompt {text[:80]!r}: {' '.join(str(err).split())}") \
            from err


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


class TextStream:
    """The text of a growing list of ids, handed out piece by piece as tokens arrive.

    Decoding token by token is wrong for byte-level and sentencepiece vocabularies (a character can span
    tokens, a space belongs to the next token), so each call decodes all ids so far and returns what is new;
    a trailing U+FFFD (an incomplete UTF-8 sequence) waits for the next token.
    """

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def push(self, ids: list[int]) -> str:
        self.ids += ids
        text = decode(self.tokenizer, self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.text):
            return ""
        new, self.text = text[len(self.text):], text
        return new
