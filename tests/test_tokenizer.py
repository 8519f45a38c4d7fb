"""The offline CLIP tokenizer gives CLIP's reference ids (open_clip's SimpleTokenizer) on varied prompts."""

from __future__ import annotations

import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip  # noqa: E402
import pytest  # noqa: E402
from open_clip.tokenizer import SimpleTokenizer  # noqa: E402
from transformers import CLIPTokenizer  # noqa: E402

from pipelines.tokenizer import clean_prompt, offline_clip_tokenizer  # noqa: E402

CONTEXT = 77
EOT = 49407

WORDS = (
    "a photo of cat dog astronaut riding horse on the moon portrait woman man city skyline at night sunset over "
    "mountains bowl fruit still life red blue green yellow golden tree forest river castle dragon robot car bicycle "
    "church garbage truck parachute english springer chain saw french horn gas pump tench cassette player"
).split()
STYLES = ("Van Gogh", "Picasso", "Monet", "Kelly McKernan", "Greg Rutkowski", "ukiyo-e", "cubism", "art nouveau")
MODIFIERS = ("highly detailed", "8k", "trending on artstation", "octane render", "(masterpiece:1.2)", "[[blurry]]")
PUNCT = ("!", "?", "...", ",", ";", ":", "-", "--", "'s", "'ll", "n't", "(", ")", "[", "]", "{", "}", "/", "#", "@")
UNICODE = (
    "café",
    "naïve",
    "Ångström",
    "crème brûlée",
    "Zürich",
    "São Paulo",
    "Dvořák",
    "İstanbul",
    "straße",
    "ΣΊΣΥΦΟΣ",
    "東京の夜景",
    "北京",
    "서울",
    "Москва",
    "مرحبا",
    "שלום",
    "हिन्दी",
    "ไทย",
    "🐱",
    "🚀🌕",
    "👩‍🚀",
    "👍🏽",
    "🇫🇷",
    "❤️",
    "e\u0301",
    "n\u0303o",
    "a\u0308\u0304",
    "“quoted”",
    "‘single’",
    "«guillemets»",
    "—em dash–",
    "…",
    "ﬁne ﬂower",
    "Ⅻ",
    "½",
    "²³",
    "①",
    "ＡＢＣ１２３",
    "ｆｕｌｌ　ｗｉｄｔｈ",
    "！？",
    "\u00a0nbsp",
    "zero\u200bwidth",
    "soft\u00adhyphen",
)
HTML = ("&amp;", "&lt;b&gt;", "&quot;hi&quot;", "&#39;", "&eacute;", "&amp;amp;", "&nbsp;", "&#x1F600;")
SPACES = (" ", "  ", "\t", "\n", "\r\n", "   \t ")


def _prompt(rng: random.Random) -> str:
    kind = rng.randrange(8)
    words = [rng.choice(WORDS) for _ in range(rng.randint(1, 12))]
    if kind == 0:  # plain English
        text = " ".join(words)
        return text.capitalize() if rng.random() < 0.5 else text.upper()
    if kind == 1:  # art-style prompt
        return f"{' '.join(words)}, in the style of {rng.choice(STYLES)}, {', '.join(rng.sample(MODIFIERS, 2))}"
    if kind == 2:  # punctuation glued to words
        return "".join(w + rng.choice(PUNCT) for w in words)
    if kind == 3:  # digits and numbers
        return " ".join(f"{w}{rng.randint(0, 10 ** rng.randint(1, 7))}" if rng.random() < 0.5 else w for w in words)
    if kind == 4:  # unicode mixed with ASCII
        return " ".join(rng.choice(UNICODE) if rng.random() < 0.5 else w for w in words)
    if kind == 5:  # HTML entities
        return " ".join(rng.choice(HTML) + w for w in words)
    if kind == 6:  # odd whitespace
        return rng.choice(SPACES) + "".join(w + rng.choice(SPACES) for w in words)
    # over-long: well past 77 tokens
    return " ".join(rng.choice(WORDS + list(UNICODE)) for _ in range(rng.randint(60, 150)))


def _prompts() -> list[str]:
    rng = random.Random(0)
    prompts = [_prompt(rng) for _ in range(400)]
    prompts += ["", " ", "\n\t", "a", "A", "!!!", "1234567890", "<|startoftext|>", "x <|endoftext|> y"]
    prompts += list(UNICODE) + list(HTML)
    prompts += ["word " * 100, "🐱" * 200, "supercalifragilisticexpialidocious" * 10]
    return prompts


PROMPTS = _prompts()


@pytest.fixture(scope="module")
def ours() -> CLIPTokenizer:
    return offline_clip_tokenizer()


@pytest.fixture(scope="module")
def reference() -> SimpleTokenizer:
    tokenizer = open_clip.get_tokenizer("ViT-L-14")
    # A built-in model name must resolve to the packaged BPE SimpleTokenizer, never a hub tokenizer.
    assert isinstance(tokenizer, SimpleTokenizer)
    return tokenizer


def _our_ids(tokenizer: CLIPTokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer([clean_prompt(t) for t in texts], truncation=True, max_length=CONTEXT)["input_ids"]


def _reference_ids(tokenizer: SimpleTokenizer, texts: list[str]) -> list[list[int]]:
    # open_clip pads with id 0, which is also the real token "!": cut at the first end-of-text instead.
    rows = tokenizer(texts, context_length=CONTEXT).tolist()
    return [row[: row.index(EOT) + 1] for row in rows]


def test_prompt_set_is_varied() -> None:
    assert len(PROMPTS) >= 300
    assert len(set(PROMPTS)) > 0.9 * len(PROMPTS)


def _known_divergence(text: str) -> bool:
    # Two cases where ours and open_clip's SimpleTokenizer legitimately or knowingly differ, tested separately below.
    return "<|" in text or "Σ" in text


def test_ids_match_open_clip(ours: CLIPTokenizer, reference: SimpleTokenizer) -> None:
    prompts = [p for p in PROMPTS if not _known_divergence(p)]
    assert len(prompts) >= 300
    mismatches = [
        (text, a, b)
        for text, a, b in zip(prompts, _our_ids(ours, prompts), _reference_ids(reference, prompts), strict=True)
        if a != b
    ]
    assert not mismatches, f"{len(mismatches)} prompts differ, first: {mismatches[:3]}"


def test_greek_final_sigma(ours: CLIPTokenizer, reference: SimpleTokenizer) -> None:
    prompts = ["ΟΔΥΣΣΕΥΣ", "ΣΊΣΥΦΟΣ", "a photo of ΟΔΥΣΣΕΥΣ."]
    assert _our_ids(ours, prompts) == _reference_ids(reference, prompts)


def test_special_token_literals(ours: CLIPTokenizer) -> None:
    # A literal "<|endoftext|>" in a prompt is the special token for OpenAI's CLIP and SD's transformers tokenizer;
    # open_clip 3 renamed its specials to "<end_of_text>" and so spells the literal out as text instead.
    assert _our_ids(ours, ["x <|endoftext|> y"]) == [[49406, 343, EOT, 344, EOT]]
    assert _our_ids(ours, ["<|startoftext|>"]) == [[49406, 49406, EOT]]


def test_truncation_keeps_end_of_text(ours: CLIPTokenizer, reference: SimpleTokenizer) -> None:
    long_prompts = [p for p in PROMPTS if len(reference.encode(p)) > CONTEXT - 2]
    assert len(long_prompts) >= 20
    for ids in _our_ids(ours, long_prompts):
        assert len(ids) == CONTEXT
        assert ids[0] == 49406 and ids[-1] == EOT
        assert EOT not in ids[:-1]


def test_empty_prompt(ours: CLIPTokenizer) -> None:
    assert _our_ids(ours, [""]) == [[49406, EOT]]


def test_padding_uses_end_of_text(ours: CLIPTokenizer) -> None:
    ids = ours(clean_prompt("a cat"), padding="max_length", max_length=CONTEXT)["input_ids"]
    assert len(ids) == CONTEXT and ids[:4] == [49406, 320, 2368, EOT] and set(ids[4:]) == {EOT}


def test_save_and_reload(ours: CLIPTokenizer, tmp_path) -> None:
    ours.save_pretrained(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert reloaded.model_max_length == CONTEXT
    assert reloaded.pad_token == ours.pad_token
    assert _our_ids(reloaded, PROMPTS) == _our_ids(ours, PROMPTS)
