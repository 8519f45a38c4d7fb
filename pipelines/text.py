"""Prompts into text embeddings, exactly as the pipeline conditions its UNet on them.

SD 1.x/2.x and the micro world use one text encoder; SDXL's two are concatenated along the feature axis exactly as
``StableDiffusionXLPipeline.encode_prompt`` does, so every caller sees one ``(batch, tokens, width)`` tensor. The
tokenizer is the pipeline's first one; token positions count BOS as 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .modules import Pipeline, is_sdxl

__all__ = [
    "PromptEncoding",
    "check_prompt",
    "decode_tokens",
    "encode_prompts",
    "encode_with_vectors",
    "max_prompt_tokens",
    "phrase_positions",
    "special_token_ids",
    "token_count",
    "token_embedding_matrix",
]


@dataclass
class PromptEncoding:
    """Text-encoder output for a batch of prompts, as the UNet's cross-attention consumes it."""

    prompts: list[str]
    input_ids: torch.Tensor  # (batch, tokens) of the first tokenizer
    embeddings: torch.Tensor  # (batch, tokens, width)
    lengths: torch.Tensor  # (batch,) number of real tokens, BOS and EOS included
    pooled: torch.Tensor | None = None  # SDXL's pooled embedding of the second encoder

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


def phrase_positions(pipe: Pipeline, prompt: str, phrase: str) -> list[int]:
    """Token positions (BOS = 0) that ``phrase`` occupies inside ``prompt``; its last occurrence wins."""
    ids = pipe.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    sub = pipe.tokenizer(phrase, add_special_tokens=False)["input_ids"]
    for start in range(len(ids) - len(sub), -1, -1):
        if ids[start : start + len(sub)] == sub:
            return [1 + start + i for i in range(len(sub))]
    raise ValueError(f"phrase {phrase!r} does not occur in prompt {prompt!r}")


def encode_prompts(pipe: Pipeline, prompts: Sequence[str], grad: bool = False) -> PromptEncoding:
    """Per-token text embeddings exactly as the pipeline computes them for generation; ``grad``: with gradients
    (a text encoder being trained), else without."""
    with torch.set_grad_enabled(grad):
        return _encode_prompts(pipe, list(prompts))


def _encode_prompts(pipe: Pipeline, prompts: list[str]) -> PromptEncoding:
    tok = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True)
    input_ids = torch.tensor(tok["input_ids"])
    lengths = torch.tensor([sum(m) for m in tok["attention_mask"]])
    options = dict(device=pipe.unet.device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    if is_sdxl(pipe):
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, **options)
    else:
        embeds, _ = pipe.encode_prompt(prompts, **options)
        pooled = None
    return PromptEncoding(prompts, input_ids, embeds, lengths, pooled)


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

    ``ValueError`` when a template lacks ``{}`` or has it twice, or when a prompt would be longer than the text
    encoder reads; ``NotImplementedError`` on SDXL (two encoders, two input embeddings).
    """
    if is_sdxl(pipe):
        raise NotImplementedError("encode_with_vectors: free token vectors are SD 1.x/2.x only, not on SDXL yet")
    templates = list(templates)
    if not templates:
        raise ValueError("encode_with_vectors needs at least one template")
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    embedding = encoder.get_input_embeddings()
    width = embedding.embedding_dim
    if vectors.dim() == 2:
        vectors = vectors.unsqueeze(0).expand(len(templates), -1, -1)
    if vectors.dim() != 3 or vectors.shape[0] != len(templates) or vectors.shape[2] != width:
        raise ValueError(f"vectors must be (k, {width}) or (templates, k, {width}), got {tuple(vectors.shape)}")
    k, length = vectors.shape[1], tokenizer.model_max_length
    if k < 1:
        raise ValueError("vectors hold no slot (k = 0)")
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
    mask = None  # as the pipeline's encode_prompt: a mask only for encoders configured to take one
    if getattr(encoder.config, "use_attention_mask", False):
        mask = (torch.arange(length) < torch.tensor(lengths).unsqueeze(1)).long().to(device)
    handle = embedding.register_forward_hook(insert)
    try:
        embeds = encoder(input_ids.to(device), attention_mask=mask)[0]
    finally:
        handle.remove()
    names = [t.replace("{}", " ".join(f"<v{i}>" for i in range(k))) for t in templates]
    return PromptEncoding(names, input_ids, embeds.to(encoder.dtype), torch.tensor(lengths))


def token_embedding_matrix(pipe: Pipeline) -> torch.Tensor:
    """The text encoder's input token embeddings, ``(vocab, width)``, detached (shares the weight's storage: read
    it, do not write it). Row ``i`` is what token id ``i`` puts into :func:`encode_with_vectors`' slots."""
    if is_sdxl(pipe):
        raise NotImplementedError("token_embedding_matrix: SD 1.x/2.x only, not on SDXL yet")
    return pipe.text_encoder.get_input_embeddings().weight.detach()


def special_token_ids(pipe: Pipeline) -> set[int]:
    """The tokenizer's special token ids (start, end, padding, unknown)."""
    tokenizer = pipe.tokenizer
    ids = tokenizer.convert_tokens_to_ids(list(tokenizer.special_tokens_map.values()))
    return {int(i) for i in ids if i is not None}


def decode_tokens(pipe: Pipeline, ids: Sequence[int] | torch.Tensor) -> str:
    """Text of token ids (special tokens dropped), as the tokenizer writes it back."""
    ids = [int(i) for i in (ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else ids)]
    return pipe.tokenizer.decode(ids, skip_special_tokens=True).strip()
