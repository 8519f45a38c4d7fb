"""The real CLIP tokenizer, built offline from the BPE vocabulary that open_clip ships, and the one reading of a
concept's text.

Stable Diffusion's tokenizer is OpenAI CLIP's byte-level BPE with 49408 tokens. open_clip carries the same merges
(``bpe_simple_vocab_16e6.txt.gz``), so the vocabulary can be rebuilt without the hub, with ids identical to SD's.

A concept is read once, by :func:`concept_text`: CLIP's own clean-up plus NFKC, so that "Van  Gogh", "van gogh" and
the same words in fullwidth letters are one concept, the one the text encoder is fed. That form is what is tokenised,
compared (duplicates, a guide equal to its concept), looked up in the micro world and named on disk
(:func:`concept_folder`). Torch-free and cheap: the scripts read concepts with it before a model loads.
"""

from __future__ import annotations

import gzip
import html
import importlib.resources
import re
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import ftfy

if TYPE_CHECKING:
    from transformers import CLIPTokenizer, PreTrainedTokenizerBase

__all__ = [
    "bpe_vocabulary_path",
    "clean_prompt",
    "clip_vocab_and_merges",
    "concept_folder",
    "concept_text",
    "offline_clip_tokenizer",
    "offline_t5_tokenizer",
]

START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
# CLIP keeps the first 48894 merges: 49408 ids = 256 bytes * 2 (with and without "</w>") + merges + 2 specials.
_NUM_MERGES = 49152 - 256 - 2


def bpe_vocabulary_path() -> Path:
    """Path of open_clip's packaged BPE merges file."""
    return Path(str(importlib.resources.files("open_clip") / "bpe_simple_vocab_16e6.txt.gz"))


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable-unicode table, which CLIP's vocabulary is written in.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary (token -> id) and merge list, in the order that fixes the ids."""
    with gzip.open(bpe_vocabulary_path(), "rt", encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1 : _NUM_MERGES + 1]]
    byte_symbols = list(_bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols]
    tokens += ["".join(m) for m in merges]
    tokens += [START_OF_TEXT, END_OF_TEXT]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != 49408:
        raise RuntimeError(f"rebuilt CLIP vocabulary has {len(vocab)} tokens, expected 49408: {bpe_vocabulary_path()}")
    return vocab, merges


def offline_clip_tokenizer(model_max_length: int = 77, pad_token: str = END_OF_TEXT) -> CLIPTokenizer:
    """A ``transformers.CLIPTokenizer`` equal to SD 1.x's, built with no download.

    ``pad_token`` is ``<|endoftext|>`` as in SD 1.x; SD 2.x and open_clip pad with ``"!"`` (id 0).
    """
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        pad_token=pad_token,
        model_max_length=model_max_length,
    )


def clean_prompt(text: str) -> str:
    """Normalise a prompt as CLIP's reference tokenizer does before BPE.

    ftfy repairs mojibake and curly quotes, HTML entities are unescaped (twice, as CLIP does), whitespace is
    collapsed and the text lower-cased. The tokenizers-backed ``CLIPTokenizer`` skips these steps, so ids match
    CLIP's only after this.
    """
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    # Lower-case the whole string at once, as CLIP does: per-character lowering gets Greek final sigma wrong.
    return re.sub(r"\s+", " ", text).strip().lower()


def concept_text(text: str) -> str:
    """A concept (or guide, or preserved concept) as the text encoder is fed it: NFKC, then CLIP's clean-up
    (:func:`clean_prompt`: ftfy, HTML entities, whitespace, lower case), then NFKC again for what the clean-up
    produced. Idempotent.

    NFKC is ours: CLIP's BPE keeps fullwidth and other compatibility forms as they are and splits them into byte
    tokens, so "van gogh" in fullwidth letters would be a different concept from "van gogh" to the model while it
    reads the same to a user.
    """
    text = clean_prompt(unicodedata.normalize("NFKC", text))
    return unicodedata.normalize("NFKC", text)


def concept_folder(text: str) -> str:
    """A file-name-safe folder name for a concept, distinct for distinct :func:`concept_text` readings: the
    reading's :func:`pipelines.files.folder_name` (``van gogh`` -> ``van-gogh``; ``van-gogh``, emoji or a long
    reading get a hash of the reading)."""
    from .files import folder_name

    return folder_name(concept_text(text))


#: T5's special pieces and their ids (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2), as in every T5 checkpoint.
T5_SPECIAL_PIECES = ("<pad>", "</s>", "<unk>")


@lru_cache(maxsize=1)
def _t5_pieces() -> tuple[tuple[str, float], ...]:
    """A SentencePiece-style Unigram vocabulary made from CLIP's: each CLIP word-final token ``w</w>`` becomes the
    word-initial piece ``▁w`` and each other token a continuation piece, every piece scored alike, so that the
    Unigram segmentation is the one with the fewest pieces (whole words where CLIP has them)."""
    vocab, _ = clip_vocab_and_merges()
    pieces: dict[str, float] = {p: 0.0 for p in T5_SPECIAL_PIECES}
    pieces["▁"] = -2.0
    for token in vocab:
        if token in (START_OF_TEXT, END_OF_TEXT):
            continue
        piece = "▁" + token.removesuffix("</w>") if token.endswith("</w>") else token
        pieces.setdefault(piece, -1.0)
    return tuple(pieces.items())


def offline_t5_tokenizer(model_max_length: int = 512) -> PreTrainedTokenizerBase:
    """A T5-style tokenizer (``transformers.T5TokenizerFast``) built with no download and no sentencepiece.

    T5's own SentencePiece model is not shipped offline, so this one is a stand-in with T5's conventions, which is
    what the tiny SD3 and Flux pipelines need: Unigram over ``▁``-prefixed pieces (:func:`_t5_pieces`), ids 0/1/2
    for ``<pad>``/``</s>``/``<unk>``, no start token, ``</s>`` appended, padding with ``<pad>``. Token ids are NOT
    those of a real T5 checkpoint. Saved with ``save_pretrained`` it loads back from its ``tokenizer.json``.
    """
    from transformers import T5TokenizerFast

    return T5TokenizerFast(vocab=list(_t5_pieces()), extra_ids=0, model_max_length=model_max_length)
