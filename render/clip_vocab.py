"""The real CLIP BPE tokenizer, rebuilt offline from the table open_clip ships.

Stable Diffusion's tokenizer (openai/clip-vit-large-patch14) is a byte-level BPE with 49,408
ids: 256 byte symbols, the same 256 with an end-of-word mark, 48,894 merges, then
``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407). open_clip_torch ships the merge
list as ``bpe_simple_vocab_16e6.txt.gz``, so the vocabulary and merges files can be derived
here without the hub, giving ids identical to SD's tokenizer. Prompt-length and truncation
tests (77 tokens, A1111-style chunking) therefore behave exactly as with real models.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
VOCAB_SIZE = 49408
MAX_LENGTH = 77
BOS_ID = VOCAB_SIZE - 2  # 49406
EOS_ID = VOCAB_SIZE - 1  # 49407
_N_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48,894


def _byte_symbols() -> list[str]:
    """One printable character per byte value, in CLIP's vocabulary order.

    Bytes that are visible Latin-1 characters stand for themselves and come first; every
    other byte is given a code point from 256 upwards, in increasing byte order.
    """
    visible = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\xa1"), ord("\xac") + 1),
        *range(ord("\xae"), ord("\xff") + 1),
    ]
    shown = set(visible)
    hidden = [b for b in range(256) if b not in shown]
    return [chr(b) for b in visible] + [chr(256 + i) for i in range(len(hidden))]


def _bpe_table() -> Path:
    """Locate open_clip's merge table without importing open_clip (which imports torch)."""
    from importlib.util import find_spec

    spec = find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the CLIP BPE table comes with open_clip_torch (pip install it)")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "bpe_simple_vocab_16e6.txt.gz"
        if path.is_file():
            return path
    raise RuntimeError("open_clip_torch is installed but bpe_simple_vocab_16e6.txt.gz is missing")


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], tuple[str, ...]]:
    """Return SD's CLIP vocabulary (token -> id) and its merge rules ("a b" strings)."""
    with gzip.open(_bpe_table(), "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    merges = tuple(lines[1 : 1 + _N_MERGES])  # line 0 is a version comment
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m.split(" ")) for m in merges]
    tokens += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise RuntimeError(f"CLIP vocabulary has {len(vocab)} entries, expected {VOCAB_SIZE}")
    return vocab, merges


def write_vocab_files(folder: str | Path) -> None:
    """Write ``vocab.json`` and ``merges.txt`` (the files any transformers version reads)."""
    vocab, merges = clip_vocab_and_merges()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(
        json.dumps(vocab, ensure_ascii=False, separators=(",", ":")), encoding="utf-8"
    )
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
    )


def make_clip_tokenizer(folder: str | Path, *, pad_token: str = EOS) -> CLIPTokenizer:
    """Write the tokenizer files into ``folder`` and load them back as a CLIPTokenizer.

    Loading goes through ``from_pretrained(folder)``: in transformers 5 the ``vocab_file=``
    and ``merges_file=`` keywords are silently ignored and every text becomes ``[0, 2, 2]``.
    ``pad_token="!"`` gives SD2/SDXL's second tokenizer (id 0); SD1.5 pads with EOS.
    """
    from transformers import CLIPTokenizer

    folder = Path(folder)
    write_vocab_files(folder)
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": pad_token,
        "do_lower_case": True,
        "errors": "replace",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok = CLIPTokenizer.from_pretrained(str(folder), model_max_length=MAX_LENGTH)
    if tok("a photo of a cat").input_ids != [BOS_ID, 320, 1125, 539, 320, 2368, EOS_ID]:
        raise RuntimeError("the rebuilt CLIP tokenizer does not match Stable Diffusion's ids")
    return tok
