"""Prompts into text embeddings, exactly as the pipeline conditions its denoiser on them.

SD 1.x/2.x and the micro world use one text encoder; SDXL's two are concatenated along the feature axis exactly as
``StableDiffusionXLPipeline.encode_prompt`` does, so every caller sees one ``(batch, tokens, width)`` tensor, and a
pooled vector where the model takes one. SD3 joins its two CLIPs' tokens (77 rows, zero-padded to T5's width) and T5's
(256 rows) as ``StableDiffusion3Pipeline.encode_prompt`` does; Flux conditions on T5's tokens (512 rows, the
pipeline's default length) and CLIP's pooled vector.

Token positions index the embeddings' rows, counted by the pipeline's *position tokenizer*: the first (CLIP) one, whose
BOS is row 0, everywhere but Flux, whose T5 tokenizer has no start token (its first word is row 0). SD3's positions
therefore address the CLIP rows. Prompt length limits are CLIP's (75 tokens) on every model, the shortest reader.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .architectures import ARCHITECTURE_NAMES
from .modules import Pipeline, architecture, is_sdxl

__all__ = [
    "FLUX_T5_LENGTH",
    "FREE_VECTOR_ARCHITECTURES",
    "PromptEncoding",
    "TokenStream",
    "check_prompt",
    "decode_tokens",
    "encode_prompt_prefixes",
    "encode_prompts",
    "encode_with_vectors",
    "last_token_position",
    "max_prompt_tokens",
    "phrase_positions",
    "prefix_encodable",
    "slot_token_ids",
    "special_token_ids",
    "start_tokens",
    "token_count",
    "text_length",
    "token_encoder",
    "token_embedding_matrix",
    "token_rows",
    "token_streams",
    "stream_token_ids",
    "verbatim_stream",
    "verbatim_token_sets",
]

#: Where one table holds every token's input embeddings (:func:`token_embedding_matrix`): the pipelines that read text
#: through CLIP alone (SDXL's two side by side). SD3 and Flux also read T5, whose vocabulary is another: there a slot
#: holds a token that every tokenizer reads as one (:func:`slot_token_ids`, :func:`token_rows`).
FREE_VECTOR_ARCHITECTURES: tuple[str, ...] = ("sd", "sdxl")
#: The words :func:`encode_with_vectors` writes in the slots on SD3/Flux before the hooks replace their rows; two, so
#: that the slots are the positions where the two fillings' token ids differ.
SLOT_WORDS: tuple[str, str] = ("x", "y")
#: Per pipeline, :func:`_slot_table` (computed once: a pass over the position tokenizer's vocabulary)
_SLOT_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: T5 tokens Flux reads (``FluxPipeline.__call__``'s default ``max_sequence_length``; FLUX.1-schnell users pass 256).
FLUX_T5_LENGTH = 512
#: T5 tokens SD3 reads (``StableDiffusion3Pipeline.__call__``'s default).
SD3_T5_LENGTH = 256


@dataclass
class PromptEncoding:
    """Text-encoder output for a batch of prompts, as the UNet's cross-attention consumes it."""

    prompts: list[str]
    input_ids: torch.Tensor  # (batch, tokens) of the position tokenizer (CLIP; Flux: T5)
    embeddings: torch.Tensor  # (batch, tokens, width)
    lengths: torch.Tensor  # (batch,) number of real tokens, BOS (where there is one) and EOS included
    pooled: torch.Tensor | None = None  # the pooled text vector of SDXL (second CLIP), SD3 (both CLIPs), Flux (CLIP)

    def eos_position(self, index: int) -> int:
        return int(self.lengths[index]) - 1

    def select(self, index: torch.Tensor | Sequence[int]) -> PromptEncoding:
        """The encoding of a sub-batch (rows may repeat): what a training batch drawn from a prompt set needs."""
        rows = torch.as_tensor(index, dtype=torch.long)
        return PromptEncoding(
            [self.prompts[int(i)] for i in rows],
            self.input_ids[rows],
            self.embeddings[rows.to(self.embeddings.device)],
            self.lengths[rows],
            None if self.pooled is None else self.pooled[rows.to(self.pooled.device)],
        )


@dataclass(frozen=True)
class TokenStream:
    """One text encoder's rows in the token embeddings the denoiser reads: its tokenizer (whose positions index
    them), the first row and the number of rows."""

    tokenizer: object
    offset: int
    length: int


def token_streams(pipe: Pipeline) -> list[TokenStream]:
    """The token embeddings' streams, in row order: CLIP's 77 rows (SDXL's two encoders side by side, one stream),
    Flux's T5 rows, or SD3's CLIP rows then its T5 rows (``StableDiffusion3Pipeline.encode_prompt`` joins them)."""
    kind = architecture(pipe)
    if kind == "flux":
        return [TokenStream(pipe.tokenizer_2, 0, FLUX_T5_LENGTH)]
    clip = TokenStream(pipe.tokenizer, 0, pipe.tokenizer.model_max_length)
    return [clip, TokenStream(pipe.tokenizer_3, clip.length, SD3_T5_LENGTH)] if kind == "sd3" else [clip]


def _position_tokenizer(pipe: Pipeline):  # noqa: ANN202 - a transformers tokenizer
    """The tokenizer whose positions index the token embeddings' first rows: T5 for Flux, else the first CLIP."""
    return token_streams(pipe)[0].tokenizer


def _leading_specials(tokenizer) -> int:  # noqa: ANN001
    """1 when the tokenizer starts every prompt with BOS (CLIP), 0 when it does not (T5)."""
    ids = tokenizer("")["input_ids"]
    return int(tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id])


def start_tokens(pipe: Pipeline, component: str | None = None) -> int:
    """Tokens a tokenizer puts before a prompt's first word: 1 (CLIP's BOS) or 0 (T5, no start token); of the text
    encoder ``component`` names (``text_encoder``, ``text_encoder_2``, ``text_encoder_3``), by default the position
    tokenizer's (the ids of :class:`PromptEncoding`)."""
    if component is None:
        return _leading_specials(_position_tokenizer(pipe))
    readers = {name: tokenizer for name, tokenizer, _ in _token_readers(pipe)}
    if component not in readers:
        raise ValueError(f"the pipeline has no text encoder {component!r}; it has {', '.join(readers)}")
    return _leading_specials(readers[component])


def token_encoder(pipe: Pipeline) -> str:
    """The component name of the text encoder whose outputs are most of the token rows the denoiser reads: the
    first CLIP (``text_encoder``) on SD 1.x/2.x and SDXL, T5 on SD3 (``text_encoder_3``, its 256 rows beside CLIP's
    77; the first CLIP where T5 is not loaded) and Flux (``text_encoder_2``; its CLIP gives the pooled vector
    alone)."""
    kind = architecture(pipe)
    if kind == "flux":
        return "text_encoder_2"
    if kind == "sd3" and getattr(pipe, "text_encoder_3", None) is not None:
        return "text_encoder_3"
    return "text_encoder"


def text_length(pipe: Pipeline) -> int:
    """Rows of token embeddings that token positions address: CLIP's 77, Flux's T5 length."""
    return FLUX_T5_LENGTH if architecture(pipe) == "flux" else pipe.tokenizer.model_max_length


def last_token_position(pipe: Pipeline, prompt: str, stream: int = 0) -> int:
    """The row of a prompt's last word, as the reference UCE scripts compute it: ``attention_mask.sum() - 2`` of the
    stream's tokenizer (:func:`token_streams`; the first by default), modulo its length, plus its offset. With CLIP
    that is BOS (row 0) for the empty prompt; with T5 (no BOS) it is -1 for the empty prompt, i.e. the last padding
    row (``uce_flux_edit.py``'s behaviour)."""
    found = token_streams(pipe)[stream]
    mask = found.tokenizer(prompt, padding="max_length", max_length=found.length, truncation=True)["attention_mask"]
    return found.offset + (sum(mask) - 2) % found.length


def max_prompt_tokens(pipe: Pipeline) -> int:
    """Tokens a prompt may have, BOS and EOS excluded."""
    return pipe.tokenizer.model_max_length - 2


def token_count(pipe: Pipeline, prompt: str) -> int:
    """Tokens of ``prompt`` without BOS/EOS, untruncated."""
    return len(pipe.tokenizer(prompt, add_special_tokens=False, truncation=False)["input_ids"])


def check_prompt(pipe: Pipeline, prompt: str, what: str = "prompt") -> str:
    """Return ``prompt`` stripped, or raise ``ValueError`` if it is empty or longer than the text encoder reads."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{what} is empty")
    n, limit = token_count(pipe, prompt.strip()), max_prompt_tokens(pipe)
    if n > limit:
        raise ValueError(f"{what} {prompt[:40]!r}... has {n} tokens; the text encoder reads {limit}")
    return prompt.strip()


def stream_token_ids(pipe: Pipeline, prompt: str, stream: int = 0) -> list[int]:
    """The token ids a stream of :func:`token_streams` holds for ``prompt`` in its first rows, before the padding:
    BOS (where the tokenizer adds one), the words, EOS, truncated to the stream's length."""
    found = token_streams(pipe)[stream]
    return found.tokenizer(prompt, truncation=True, max_length=found.length)["input_ids"]


def phrase_positions(pipe: Pipeline, prompt: str, phrase: str, stream: int = 0) -> list[int]:
    """Token positions (embedding rows: BOS = 0 with CLIP, the first word = 0 with Flux's T5) that ``phrase``
    occupies inside ``prompt`` in a stream of :func:`token_streams` (the first by default; SD3's T5 rows follow its
    77 CLIP rows); its last occurrence wins."""
    found = token_streams(pipe)[stream]
    tokenizer = found.tokenizer
    offset = found.offset + _leading_specials(tokenizer)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    sub = tokenizer(phrase, add_special_tokens=False)["input_ids"]
    for start in range(len(ids) - len(sub), -1, -1):
        if ids[start : start + len(sub)] == sub:
            return [offset + start + i for i in range(len(sub))]
    raise ValueError(f"phrase {phrase!r} does not occur in prompt {prompt!r}")


def encode_prompts(pipe: Pipeline, prompts: Sequence[str], grad: bool = False) -> PromptEncoding:
    """Per-token text embeddings exactly as the pipeline computes them for generation; ``grad``: with gradients
    (a text encoder being trained), else without."""
    with torch.set_grad_enabled(grad):
        return _encode_prompts(pipe, list(prompts))


def _encode_prompts(pipe: Pipeline, prompts: list[str]) -> PromptEncoding:
    tokenizer, kind = _position_tokenizer(pipe), architecture(pipe)
    tok = tokenizer(prompts, padding="max_length", max_length=text_length(pipe), truncation=True)
    input_ids = torch.tensor(tok["input_ids"])
    lengths = torch.tensor([sum(m) for m in tok["attention_mask"]])
    if kind == "flux":
        device = pipe.transformer.device
        embeds, pooled, _ = pipe.encode_prompt(prompts, device=device, max_sequence_length=FLUX_T5_LENGTH)
        return PromptEncoding(prompts, input_ids, embeds, lengths, pooled)
    if kind == "sd3":
        options = dict(device=pipe.transformer.device, do_classifier_free_guidance=False)
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, max_sequence_length=SD3_T5_LENGTH, **options)
        return PromptEncoding(prompts, input_ids, embeds, lengths, pooled)
    options = dict(device=pipe.unet.device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    if is_sdxl(pipe):
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, **options)
    else:
        embeds, _ = pipe.encode_prompt(prompts, **options)
        pooled = None
    return PromptEncoding(prompts, input_ids, embeds, lengths, pooled)


def prefix_encodable(pipe: Pipeline) -> bool:
    """Whether every text encoder is causal, so that :func:`encode_prompt_prefixes` encodes only the prefix:
    SD 1.x/2.x and SDXL with CLIP text encoders (not SD3/Flux, whose T5 attends both ways)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if architecture(pipe) not in ("sd", "sdxl"):
        return False
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if is_sdxl(pipe) else [])
    return all(isinstance(encoder, CLIPTextModel | CLIPTextModelWithProjection) for encoder in encoders)


@torch.no_grad()
def encode_prompt_prefixes(pipe: Pipeline, prompts: Sequence[str], length: int) -> PromptEncoding:
    """The first ``length`` token positions of :func:`encode_prompts`' embeddings, computed from those positions
    alone where the text encoders are causal (:func:`prefix_encodable`).

    CLIP's text transformer is causal (position i attends to positions <= i) and its final layer norm works per
    token, so the first ``length`` outputs depend on the first ``length`` tokens only: SD 1.x/2.x and SDXL encode
    just that prefix, as their ``encode_prompt`` calls the encoders (SD: last hidden state; SDXL: both encoders'
    penultimate hidden states side by side). Any other pipeline is encoded whole and sliced. ``pooled`` is
    ``None`` (the pooled embedding is read at EOS, which a prefix may not reach).
    """
    prompts = list(prompts)
    full = text_length(pipe)
    if not 1 <= length <= full:
        raise ValueError(f"prefix length must be in 1..{full}, got {length}")
    if not prefix_encodable(pipe):
        whole = encode_prompts(pipe, prompts)
        return PromptEncoding(prompts, whole.input_ids, whole.embeddings[:, :length], whole.lengths)
    tok = pipe.tokenizer(prompts, padding="max_length", max_length=full, truncation=True, return_tensors="pt")
    pairs = [(tok, pipe.text_encoder)]
    if is_sdxl(pipe):
        second = pipe.tokenizer_2(prompts, padding="max_length", max_length=full, truncation=True, return_tensors="pt")
        pairs.append((second, pipe.text_encoder_2))
    # the device encode_prompt runs the encoders on (the UNet's, which they share), read without walking the UNet
    device, parts = next(pipe.text_encoder.parameters()).device, []
    for ids, encoder in pairs:
        mask = None
        if getattr(encoder.config, "use_attention_mask", False):
            mask = ids.attention_mask[:, :length].to(device)
        out = encoder(ids.input_ids[:, :length].to(device), attention_mask=mask, output_hidden_states=is_sdxl(pipe))
        parts.append(out.hidden_states[-2] if is_sdxl(pipe) else out[0])
    dtype = (pipe.text_encoder_2 if is_sdxl(pipe) else pipe.text_encoder).dtype
    embeds = torch.cat(parts, dim=-1).to(dtype=dtype, device=device)
    return PromptEncoding(prompts, tok.input_ids, embeds, tok.attention_mask.sum(dim=1))


def _check_free_vectors(pipe: Pipeline, what: str) -> None:
    """``NotImplementedError`` in one line where one table does not hold every token (SD3 and Flux: T5's vocabulary
    beside CLIP's)."""
    if architecture(pipe) not in FREE_VECTOR_ARCHITECTURES:
        name = ARCHITECTURE_NAMES[architecture(pipe)]
        raise NotImplementedError(f"{what}: {name} reads CLIP's and T5's vocabularies; use token_rows of "
                                  "slot_token_ids")  # fmt: skip


def _text_encoders(pipe: Pipeline) -> list[tuple[object, torch.nn.Module]]:
    """(tokenizer, text encoder) pairs whose outputs the UNet reads side by side: one, or SDXL's two."""
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if is_sdxl(pipe):
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def encode_with_vectors(pipe: Pipeline, templates: Sequence[str], vectors: torch.Tensor) -> PromptEncoding:
    """Text embeddings of prompts in which free input-embedding vectors stand for words, differentiably.

    Each template holds ``{}`` exactly once; its prompt is BOS + tokens(text before ``{}``) + k slots +
    tokens(text after) + EOS + padding, and the slots' *input token embeddings* (the text encoder's
    ``get_input_embeddings()`` output, before position embeddings) are ``vectors``: ``(k, width)`` for every
    template alike or ``(len(templates), k, width)`` one set per template. Everything else is what
    :func:`encode_prompts` computes for ordinary text, so a slot holding a real token's row of
    :func:`token_embedding_matrix` gives that token's encoding. Gradients flow to ``vectors`` (the function runs
    under the caller's grad mode). The vectors enter through a forward hook on the input-embedding module, removed
    before returning; ``input_ids`` holds BOS's id at the slots, a placeholder the hook overwrites.

    On SDXL a vector is the token's input embeddings of both encoders side by side (``width`` = 768 + 1280 for
    SDXL's), each encoder reading its own part as ``StableDiffusionXLPipeline.encode_prompt`` reads text (the
    penultimate layer, the pooled embedding from the second encoder). On SD3 and Flux a vector is the token's input
    embeddings in every text encoder side by side (SD3: CLIP-L, CLIP-G, T5; Flux: CLIP, T5: :func:`token_rows`),
    each encoder's part entering its own slots (:func:`_encode_with_vectors_by_hooks`). ``ValueError`` when a
    template lacks ``{}`` or has it twice, or when a prompt would be longer than the text encoder reads.
    """
    templates = list(templates)
    if not templates:
        raise ValueError("encode_with_vectors needs at least one template")
    if architecture(pipe) not in FREE_VECTOR_ARCHITECTURES:
        return _encode_with_vectors_by_hooks(pipe, templates, vectors)
    encoders = _text_encoders(pipe)
    widths = [encoder.get_input_embeddings().embedding_dim for _, encoder in encoders]
    vectors = _check_vectors(vectors, len(templates), widths)
    parts = torch.split(vectors, widths, dim=-1)
    runs = [
        _encode_slots(pipe, tok, encoder, templates, part)
        for (tok, encoder), part in zip(encoders, parts, strict=True)
    ]
    input_ids, lengths, out = runs[0]
    if len(runs) == 1:
        embeds, pooled = out[0], None
    else:  # SDXL: the penultimate layers side by side, the second encoder's projected, pooled embedding
        embeds, pooled = torch.cat([o.hidden_states[-2] for _, _, o in runs], dim=-1), runs[-1][2][0]
    k = vectors.shape[1]
    names = [t.replace("{}", " ".join(f"<v{i}>" for i in range(k))) for t in templates]
    return PromptEncoding(names, input_ids, embeds.to(encoders[0][1].dtype), torch.tensor(lengths), pooled)


def _check_vectors(vectors: torch.Tensor, templates: int, widths: Sequence[int]) -> torch.Tensor:
    """``vectors`` as ``(templates, k, sum(widths))`` (a ``(k, width)`` set repeated for every template);
    ``ValueError`` for another shape or no slot."""
    width = sum(widths)
    if vectors.dim() == 2:
        vectors = vectors.unsqueeze(0).expand(templates, -1, -1)
    if vectors.dim() != 3 or vectors.shape[0] != templates or vectors.shape[2] != width:
        raise ValueError(f"vectors must be (k, {width}) or (templates, k, {width}), got {tuple(vectors.shape)}")
    if vectors.shape[1] < 1:
        raise ValueError("vectors hold no slot (k = 0)")
    return vectors


def _token_readers(pipe: Pipeline) -> list[tuple[str, object, torch.nn.Module]]:
    """(component, tokenizer, text encoder) of every text encoder the pipeline has, in component order (SD3: CLIP-L,
    CLIP-G, T5 where it is loaded; Flux: CLIP, T5)."""
    found = []
    for suffix in ("", "_2", "_3"):
        encoder, tokenizer = getattr(pipe, f"text_encoder{suffix}", None), getattr(pipe, f"tokenizer{suffix}", None)
        if isinstance(encoder, torch.nn.Module) and tokenizer is not None:
            found.append((f"text_encoder{suffix}", tokenizer, encoder))
    return found


def _input_embedding(encoder: torch.nn.Module) -> torch.nn.Embedding:
    """The token-embedding module the encoder's forward calls: a T5 encoder's stack's ``embed_tokens`` (tied to, but
    not the same module as, its ``shared``), CLIP's ``get_input_embeddings()``."""
    stack = getattr(encoder, "encoder", None)
    called = getattr(stack, "embed_tokens", None)
    return called if isinstance(called, torch.nn.Embedding) else encoder.get_input_embeddings()


def _reader_length(pipe: Pipeline, component: str, tokenizer: object) -> int:
    """Tokens the pipeline's ``encode_prompt`` pads a text encoder's prompt to: CLIP's 77, T5's SD3/Flux length."""
    if getattr(pipe, component).__class__.__name__.startswith("T5"):
        return FLUX_T5_LENGTH if architecture(pipe) == "flux" else SD3_T5_LENGTH
    return tokenizer.model_max_length


def _read_as_one(tokenizer, texts: list[str]) -> list[int]:  # noqa: ANN001 - a transformers tokenizer
    """Each text's id where ``tokenizer`` reads it as one token, else -1. A vocabulary's worth of words goes through
    a copy of the fast tokenizer's backend, which reads them in a second (a copy: without the padding and truncation
    that the tokenizer's calls leave set on its own); a few through the tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and len(texts) > 1000:
        backend = copy.deepcopy(backend)
        backend.no_padding()
        backend.no_truncation()
        read = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    else:
        read = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [ids[0] if len(ids) == 1 else -1 for ids in read]


def _slot_columns(pipe: Pipeline, ids: torch.Tensor) -> torch.Tensor:
    """``(len(ids), encoders)``: for each id of the position tokenizer, the id of the same text in every text
    encoder's tokenizer (:func:`_token_readers`' order), or -1 in the whole row where some tokenizer reads the text as
    more than one token, or the position tokenizer does not read it back as the id itself (a word piece, a special
    token). A tokenizer with the position tokenizer's vocabulary (SD3's CLIP-G) reads every id as itself."""
    position, readers = _position_tokenizer(pipe), _token_readers(pipe)
    # the tokenizer's own decoding (its backend's alone leaves CLIP's end-of-word marks in)
    texts = [t.strip() for t in position.batch_decode([[int(i)] for i in ids], skip_special_tokens=True)]
    valid = [row for row, t in enumerate(texts) if t]
    table = torch.full((len(ids), len(readers)), -1, dtype=torch.long)
    table[valid, :] = ids[valid, None]
    words = [texts[row] for row in valid]
    read_back = torch.tensor(_read_as_one(position, words), dtype=torch.long)
    for column, (_, tokenizer, _) in enumerate(readers):
        if tokenizer is not position and tokenizer.get_vocab() != position.get_vocab():
            table[valid, column] = torch.tensor(_read_as_one(tokenizer, words), dtype=torch.long)
    whole = (table >= 0).all(dim=1)
    whole[valid] &= read_back == ids[valid]
    table[~whole] = -1
    return table


def _slot_table(pipe: Pipeline) -> torch.Tensor:
    """:func:`_slot_columns` of the position tokenizer's whole vocabulary, computed once per pipeline (seconds)."""
    if pipe not in _SLOT_TABLES:
        _SLOT_TABLES[pipe] = _slot_columns(pipe, torch.arange(len(_position_tokenizer(pipe))))
    return _SLOT_TABLES[pipe]


def slot_token_ids(pipe: Pipeline) -> torch.Tensor:
    """The position tokenizer's ids whose :func:`token_rows` a slot of :func:`encode_with_vectors` can hold so that
    it encodes as the token's text: every id on SD 1.x/2.x and SDXL; on SD3/Flux the tokens every tokenizer reads as
    one (:func:`_slot_table`), sorted."""
    if architecture(pipe) in FREE_VECTOR_ARCHITECTURES:
        return torch.arange(token_embedding_matrix(pipe).shape[0])
    return (_slot_table(pipe)[:, 0] >= 0).nonzero().flatten()


def token_rows(pipe: Pipeline, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """The input embeddings of the position tokenizer's tokens ``ids``, ``(len(ids), width)``, detached: what a slot
    of :func:`encode_with_vectors` holds to encode as that token. Rows of :func:`token_embedding_matrix` on SD
    1.x/2.x and SDXL; on SD3/Flux each token's rows in every text encoder side by side (SD3: CLIP-L, CLIP-G, T5;
    Flux: CLIP, T5), ``ValueError`` for a token some tokenizer reads as several (:func:`slot_token_ids`)."""
    ids = torch.as_tensor([int(i) for i in ids] if not isinstance(ids, torch.Tensor) else ids, dtype=torch.long)
    ids = ids.reshape(-1)
    if architecture(pipe) in FREE_VECTOR_ARCHITECTURES:
        matrix = token_embedding_matrix(pipe)
        return matrix[ids.to(matrix.device)]
    table = _SLOT_TABLES[pipe][ids] if pipe in _SLOT_TABLES else _slot_columns(pipe, ids)
    if (table < 0).any():
        bad = int(ids[(table < 0).any(dim=1)][0])
        raise ValueError(f"token {bad} ({decode_tokens(pipe, [bad])!r}) is not one token in every text encoder of "
                         "this pipeline")  # fmt: skip
    parts = []
    for column, (_, _, encoder) in enumerate(_token_readers(pipe)):
        weight = _input_embedding(encoder).weight.detach()
        parts.append(weight[table[:, column].to(weight.device)])
    first = parts[0]
    return torch.cat([p.to(first.device, first.dtype) for p in parts], dim=1)


def _encode_with_vectors_by_hooks(pipe: Pipeline, templates: list[str], vectors: torch.Tensor) -> PromptEncoding:
    """:func:`encode_with_vectors` on SD3/Flux: the pipeline's own ``encode_prompt`` (:func:`encode_prompts`) of
    each template with :data:`SLOT_WORDS`' first word k times in its ``{}``, while a forward hook on every text
    encoder's token embedding puts its part of the vectors at the slots: the positions where the token ids of the
    two words' fillings differ, found per encoder. ``input_ids`` holds the first slot word's id at the slots."""
    readers = _token_readers(pipe)
    widths = [_input_embedding(encoder).embedding_dim for _, _, encoder in readers]
    vectors = _check_vectors(vectors, len(templates), widths)
    k = vectors.shape[1]
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(f"template {template!r} must contain '{{}}' exactly once")
    fillings = [[t.replace("{}", " ".join([word] * k)) for t in templates] for word in SLOT_WORDS]
    hooks = []
    for (component, tokenizer, encoder), part in zip(readers, torch.split(vectors, widths, dim=-1), strict=True):
        length = _reader_length(pipe, component, tokenizer)
        first, second = (tokenizer(f, max_length=length, truncation=True)["input_ids"] for f in fillings)
        slots = []
        for template, a, b in zip(templates, first, second, strict=True):
            differ = [j for j, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
            if len(differ) != k:
                raise ValueError(
                    f"template {template[:40]!r} with {k} vector(s) does not fit {component}: longer "
                    "than the text encoder reads, or its slots merge with the words beside them"
                )
            slots.append(differ)
        hooks.append((_input_embedding(encoder), torch.tensor(slots), part))
    handles = []

    def insert(slots: torch.Tensor, part: torch.Tensor):  # noqa: ANN202
        def hook(_module, _inputs, output):  # noqa: ANN001, ANN202 - torch's forward hook signature
            index = slots.to(output.device).unsqueeze(-1).expand(-1, -1, output.shape[-1])
            return output.scatter(1, index, part.to(output.device, output.dtype))

        return hook

    try:
        for module, slots, part in hooks:
            handles.append(module.register_forward_hook(insert(slots, part)))
        encoding = _encode_prompts(pipe, fillings[0])
    finally:
        for handle in handles:
            handle.remove()
    encoding.prompts = [t.replace("{}", " ".join(f"<v{i}>" for i in range(k))) for t in templates]
    return encoding


def _encode_slots(
    pipe: Pipeline, tokenizer: object, encoder: torch.nn.Module, templates: list[str], vectors: torch.Tensor
) -> tuple[torch.Tensor, list[int], object]:
    """One encoder's run of :func:`encode_with_vectors`: (input ids, lengths, the encoder's output)."""
    embedding = encoder.get_input_embeddings()
    k, length = vectors.shape[1], tokenizer.model_max_length
    rows, starts, lengths = [], [], []
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(f"template {template!r} must contain '{{}}' exactly once")
        before, after = template.split("{}")
        ids_before = tokenizer(before, add_special_tokens=False)["input_ids"] if before.strip() else []
        ids_after = tokenizer(after, add_special_tokens=False)["input_ids"] if after.strip() else []
        ids = [tokenizer.bos_token_id, *ids_before, *[tokenizer.bos_token_id] * k, *ids_after]
        ids.append(tokenizer.eos_token_id)
        if len(ids) > length:
            raise ValueError(f"template {template[:40]!r} with {k} vector(s) has {len(ids) - 2} tokens; the text "
                             f"encoder reads {length - 2}")  # fmt: skip
        starts.append(1 + len(ids_before))
        lengths.append(len(ids))
        rows.append(ids + [tokenizer.pad_token_id] * (length - len(ids)))
    input_ids = torch.tensor(rows)
    slots = torch.tensor(starts).unsqueeze(1) + torch.arange(k)  # (batch, k) positions of the vectors

    def insert(_module, _inputs, output):  # noqa: ANN001, ANN202 - torch's forward hook signature
        index = slots.to(output.device).unsqueeze(-1).expand(-1, -1, output.shape[-1])
        return output.scatter(1, index, vectors.to(output.device, output.dtype))

    device = pipe.unet.device
    mask = None  # as the pipeline's encode_prompt: a mask only for encoders configured to take one (never SDXL)
    if not is_sdxl(pipe) and getattr(encoder.config, "use_attention_mask", False):
        mask = (torch.arange(length) < torch.tensor(lengths).unsqueeze(1)).long().to(device)
    handle = embedding.register_forward_hook(insert)
    try:
        out = encoder(input_ids.to(device), attention_mask=mask, output_hidden_states=is_sdxl(pipe))
    finally:
        handle.remove()
    return input_ids, lengths, out


def token_embedding_matrix(pipe: Pipeline) -> torch.Tensor:
    """The text encoder's input token embeddings, ``(vocab, width)``, detached (shares the weight's storage: read
    it, do not write it). Row ``i`` is what token id ``i`` puts into :func:`encode_with_vectors`' slots; on SDXL both
    encoders' rows side by side (a copy: ``(vocab, 768 + 1280)`` for SDXL's)."""
    _check_free_vectors(pipe, "token_embedding_matrix")
    matrices = [encoder.get_input_embeddings().weight.detach() for _, encoder in _text_encoders(pipe)]
    if len({m.shape[0] for m in matrices}) > 1:
        raise ValueError(f"the text encoders' vocabularies differ ({[m.shape[0] for m in matrices]} tokens)")
    return matrices[0] if len(matrices) == 1 else torch.cat(matrices, dim=1)


def special_token_ids(pipe: Pipeline) -> set[int]:
    """The position tokenizer's special token ids (start, end, padding, unknown)."""
    return _special_ids(_position_tokenizer(pipe))


def _special_ids(tokenizer) -> set[int]:  # noqa: ANN001 - a transformers tokenizer
    ids = tokenizer.convert_tokens_to_ids(list(tokenizer.special_tokens_map.values()))
    return {int(i) for i in ids if i is not None}


def verbatim_stream(pipe: Pipeline) -> tuple[torch.nn.Module, TokenStream] | None:
    """The text encoder whose last hidden state the denoiser reads unchanged, and its rows in the denoiser's text
    input: SD 1.x/2.x's CLIP (every row), Flux's T5 (every row), SD3's T5 (the rows after CLIP's; ``None`` for an
    SD3 pipeline loaded without T5, whose rows are zeros). ``None`` on SDXL, whose UNet reads both CLIPs'
    penultimate layers side by side, no encoder's output as it is."""
    kind = architecture(pipe)
    if kind == "sdxl":
        return None
    encoder = getattr(pipe, {"sd": "text_encoder", "sd3": "text_encoder_3", "flux": "text_encoder_2"}[kind], None)
    return None if encoder is None else (encoder, token_streams(pipe)[-1])


def verbatim_token_sets(pipe: Pipeline, prompts: Sequence[str]) -> tuple[list[list[int]], list[int]]:
    """Each prompt's token ids, special tokens removed and sorted, by the tokenizer of :func:`verbatim_stream`'s
    encoder (the position tokenizer where there is none), and that tokenizer's special ids, sorted."""
    found = verbatim_stream(pipe)
    tokenizer = found[1].tokenizer if found else _position_tokenizer(pipe)
    length = found[1].length if found else text_length(pipe)
    special = _special_ids(tokenizer)
    ids = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True)["input_ids"]
    return [sorted(set(row) - special) for row in ids], sorted(special)


def decode_tokens(pipe: Pipeline, ids: Sequence[int] | torch.Tensor) -> str:
    """Text of token ids (special tokens dropped), as the tokenizer writes it back."""
    ids = [int(i) for i in (ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else ids)]
    return _position_tokenizer(pipe).decode(ids, skip_special_tokens=True).strip()
