"""Forward hooks on a pipeline: hook points, activations read out, outputs edited, low-rank changes per prompt.

Hooks only: the pipeline's classes are never patched, and every hook a function installs is removed in a ``finally``
(or by the :class:`HookHandles` it returns). A hook point's output is a sequence of tokens: a text-encoder layer's
residual stream as it is, a UNet transformer block's ``(B, C, H, W)`` hidden states with each spatial position a
token, an SD3/Flux transformer block's image tokens ``(B, N, C)`` (the second of the ``(text tokens, image tokens)``
pair its joint and single-stream blocks return; Flux's are its packed 2x2 latent patches).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from .modules import CROSS_ATTENTION_PATTERNS, Pipeline, architecture, components, denoiser, denoiser_name, module
from .sampling import DEFAULT_GUIDANCE, DEFAULT_STEPS, generate
from .text import encode_prompts, verbatim_stream

__all__ = [
    "HOOK_POINT_PATTERNS",
    "TRANSFORMER_BLOCK_PATTERNS",
    "HookHandles",
    "add_output_edit",
    "add_prompt_scaled_lora",
    "attention_probabilities",
    "capture",
    "hook_point",
    "hook_points",
    "hook_width",
    "intervene",
    "is_denoiser_hook",
    "text_activations",
    "text_attention_names",
    "unet_activations",
]

#: SD3/Flux transformer blocks as hook points: the joint (MMDiT) blocks and Flux's single-stream blocks, whose
#: outputs are ``(text tokens, image tokens)``; the hook point reads and edits the image tokens
TRANSFORMER_BLOCK_PATTERNS: tuple[str, ...] = tuple(
    f"transformer.{blocks}.{digits}"
    for blocks in ("transformer_blocks", "single_transformer_blocks")
    for digits in ("[0-9]", "[0-9][0-9]")
)

#: Where the SAE family reads and edits activations, as fnmatch patterns over qualified module names (digits spelled
#: out, since fnmatch's ``*`` would also match deeper modules): a CLIP text encoder's layers (the residual stream
#: after layer N; SDXL's second encoder too), a T5 encoder's blocks (SD3's ``text_encoder_3``, Flux's
#: ``text_encoder_2``: the first of a block's outputs, the residual stream), the UNet's transformer blocks
#: (``Transformer2DModel`` in a down, mid or up block) and an SD3/Flux transformer's blocks
#: (:data:`TRANSFORMER_BLOCK_PATTERNS`). transformers 5 names CLIPTextModel's layers ``encoder.layers.N``, earlier
#: versions ``text_model.encoder.layers.N``.
HOOK_POINT_PATTERNS: tuple[str, ...] = (
    tuple(
        f"{encoder}.{prefix}encoder.layers.{digits}"
        for encoder in ("text_encoder", "text_encoder_2")
        for prefix in ("", "text_model.")
        for digits in ("[0-9]", "[0-9][0-9]")
    )
    + tuple(
        f"{encoder}.encoder.block.{digits}"
        for encoder in ("text_encoder_2", "text_encoder_3")
        for digits in ("[0-9]", "[0-9][0-9]")
    )
    + (
        "unet.down_blocks.[0-9].attentions.[0-9]",
        "unet.mid_block.attentions.[0-9]",
        "unet.up_blocks.[0-9].attentions.[0-9]",
    )
    + TRANSFORMER_BLOCK_PATTERNS
)


class HookHandles:
    """The hooks of one intervention: ``remove()`` takes them all off (also as a context manager's exit)."""

    def __init__(self, handles: Sequence[torch.utils.hooks.RemovableHandle]) -> None:
        self._handles = list(handles)
        #: called once, after the hooks are off (e.g. to forget a record of the attachment)
        self.on_remove: list[Callable[[], None]] = []

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()
        while self.on_remove:
            self.on_remove.pop()()

    def __enter__(self) -> HookHandles:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.remove()


def _install(register: Callable[[list[torch.utils.hooks.RemovableHandle]], None]) -> HookHandles:
    """The hooks ``register`` installs (appending their handles to the list it is given), all or none: a failure
    part-way removes those already in place."""
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        register(handles)
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    return HookHandles(handles)


def is_denoiser_hook(name: str) -> bool:
    """Whether a hook point sits in the denoiser (a UNet or SD3/Flux transformer block) rather than a text encoder:
    its activations are per sampling step."""
    return name.startswith(("unet.", "transformer."))


def _stream(name: str) -> int:
    """Which of a module's tuple outputs holds its tokens: an SD3/Flux transformer block's image tokens (second),
    any other module's first."""
    return 1 if any(fnmatch.fnmatchcase(name, p) for p in TRANSFORMER_BLOCK_PATTERNS) else 0


def _output_tokens(stream: int, output: object) -> torch.Tensor:
    """A module output's tokens: ``output[stream]`` of a tuple (:func:`_stream`), the output itself otherwise."""
    return output[stream] if isinstance(output, tuple) else output


def _with_tokens(stream: int, output: object, tokens: torch.Tensor) -> object:
    """``output`` with its tokens (:func:`_output_tokens`) replaced."""
    if not isinstance(output, tuple):
        return tokens
    return (*output[:stream], tokens, *output[stream + 1 :])


def _timestep(args: tuple, kwargs: dict) -> torch.Tensor:
    """The timestep a denoiser call received (second positional argument or ``timestep=``), as a 0-d CPU tensor."""
    timestep = args[1] if len(args) > 1 else kwargs["timestep"]
    return torch.as_tensor(timestep).detach().reshape(-1)[0].cpu()


def _as_tokens(hidden: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` as ``(B, H*W, C)``; tokens ``(B, N, C)`` as they are."""
    return hidden.flatten(2).transpose(1, 2) if hidden.dim() == 4 else hidden


def hook_points(pipe: Pipeline) -> list[str]:
    """Every hook point of the pipeline: text-encoder layers and denoiser blocks, by qualified name."""
    points = []
    for component, root in components(pipe).items():
        for path, _ in root.named_modules():
            name = f"{component}.{path}"
            if any(fnmatch.fnmatchcase(name, p) for p in HOOK_POINT_PATTERNS):
                points.append(name)
    return points


def hook_point(pipe: Pipeline, name: str) -> torch.nn.Module:
    """The module a hook point names, validated: a text encoder's layer, a UNet or SD3/Flux transformer block.

    Hook points are qualified module names matching ``HOOK_POINT_PATTERNS``. ``ValueError`` in one line names the
    hook points this pipeline has when ``name`` is not one of them.
    """
    points = hook_points(pipe)
    if name not in points:
        sample = ", ".join(points[:2] + points[-2:])
        raise ValueError(f"{name!r} is not a hook point of this pipeline; it has {len(points)}, e.g. {sample}")
    return module(pipe, name)


def hook_width(pipe: Pipeline, name: str) -> int:
    """The width of a hook point's activations (features per token)."""
    point = hook_point(pipe, name)
    if name.startswith("unet."):
        return int(point.config.in_channels)  # a transformer block's output has its input's channels
    if name.startswith("transformer."):  # an MMDiT block's image tokens: the transformer's inner width
        config = module(pipe, "transformer").config
        return int(config.num_attention_heads * config.attention_head_dim)
    return int(module(pipe, name.partition(".")[0]).config.hidden_size)


@contextlib.contextmanager
def capture(pipe: Pipeline, module_names: Sequence[str]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record the outputs of the named modules (qualified names) during the ``with`` block (of a tuple output, the
    tokens: an SD3/Flux transformer block's image tokens, another module's first)."""
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in module_names}
    handles = []
    try:
        for name in module_names:
            stream = _stream(name)

            def hook(_module, _inputs, output, name=name, stream=stream):  # noqa: ANN001, ANN202 - torch's hook
                captured[name].append(_output_tokens(stream, output).detach())

            handles.append(module(pipe, name).register_forward_hook(hook))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


#: SD3/Flux attention modules in which image tokens attend to text tokens: the joint (MMDiT) blocks' attention and
#: Flux's single-stream blocks' (text and image tokens in one sequence)
TEXT_ATTENTION_PATTERNS: tuple[str, ...] = tuple(
    f"{blocks}.{digits}.attn" for blocks in ("transformer_blocks", "single_transformer_blocks")
    for digits in ("[0-9]", "[0-9][0-9]")
)  # fmt: skip


def text_attention_names(pipe: Pipeline) -> list[str]:
    """The denoiser's attention modules where image tokens attend to text tokens, qualified and sorted: a UNet's
    cross-attention (the parents of :data:`~pipelines.modules.CROSS_ATTENTION_PATTERNS`' projections), an SD3/Flux
    transformer's joint and single-stream attention."""
    found = set()
    for name, _ in denoiser(pipe).named_modules():
        if any(fnmatch.fnmatchcase(name, p) for p in CROSS_ATTENTION_PATTERNS):
            found.add(name.rpartition(".")[0])
        elif any(fnmatch.fnmatchcase(name, p) for p in TEXT_ATTENTION_PATTERNS):
            found.add(name)
    return sorted(f"{denoiser_name(pipe)}.{name}" for name in found)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, S, heads * D)`` -> ``(B, S, heads, D)``: the layout diffusers' Flux processor normalises and rotates
    (SD3's normalises ``(B, heads, S, D)``, the same per-head norm)."""
    return x.unflatten(-1, (heads, x.shape[-1] // heads))


def _joint_image_to_text(
    attention: torch.nn.Module, text_first: bool, text_tokens: int, hidden: torch.Tensor,
    context: torch.Tensor | None, rotary: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:  # fmt: skip
    """The attention probabilities of the image queries over the text keys, ``(B, heads, image, text)``, of one SD3
    (``JointAttnProcessor2_0``) or Flux (``FluxAttnProcessor``) attention call, its softmax over every key (text and
    image) as the processor takes it: queries and keys from the module's own projections and query/key norms, joined
    in the processor's order (SD3: image then text; Flux: text then image, rotated by ``image_rotary_emb``). With
    ``context`` None (Flux's single-stream blocks) the first ``text_tokens`` of ``hidden`` are the text."""
    from diffusers.models.embeddings import apply_rotary_emb

    if getattr(attention, "fused_projections", False):
        raise ValueError("the attention's projections are fused (to_qkv): unfuse them to record its probabilities")
    heads = attention.heads
    q, k = _heads(attention.to_q(hidden), heads), _heads(attention.to_k(hidden), heads)
    q = q if attention.norm_q is None else attention.norm_q(q)
    k = k if attention.norm_k is None else attention.norm_k(k)
    if context is not None:
        q_text, k_text = _heads(attention.add_q_proj(context), heads), _heads(attention.add_k_proj(context), heads)
        q_text = q_text if attention.norm_added_q is None else attention.norm_added_q(q_text)
        k_text = k_text if attention.norm_added_k is None else attention.norm_added_k(k_text)
        q, k = (torch.cat([t, x] if text_first else [x, t], dim=1) for t, x in ((q_text, q), (k_text, k)))
        text_tokens = context.shape[1]
    if rotary is not None:
        q, k = apply_rotary_emb(q, rotary, sequence_dim=1), apply_rotary_emb(k, rotary, sequence_dim=1)
    q, k = q.transpose(1, 2).float(), k.transpose(1, 2).float()  # (B, heads, S, D)
    total = q.shape[2]
    text = slice(0, text_tokens) if text_first else slice(total - text_tokens, total)
    image = slice(text_tokens, total) if text_first else slice(0, total - text_tokens)
    probabilities = (q[:, :, image] @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)
    return probabilities[..., text]


@contextlib.contextmanager
def attention_probabilities(pipe: Pipeline, attention_names: Sequence[str]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record, differentiably, the attention probabilities of image queries over text keys in the named attention
    modules (qualified names, :func:`text_attention_names`) during the ``with`` block, ``(batch, heads, image
    queries, text keys)`` float32 for every call.

    A UNet's cross-attention (``"unet.<block>.attn2"``): ``softmax(q k^T * scale)`` per head from the outputs of the
    module's ``to_q`` and ``to_k`` (whatever adapters they hold) as diffusers' attention processors form them (no
    query/key norm: SD 1.x/2.x/XL's blocks); hooks on ``to_q`` and ``to_k``. SD3/Flux's joint attention
    (``"transformer.<blocks>.N.attn"``): the image rows and text columns of the joint softmax over text and image
    keys (:func:`_joint_image_to_text`), from the module's inputs (a forward pre-hook; Flux's single-stream blocks
    tell the text length from their own inputs). Hooks removed afterwards."""
    found: dict[str, list[torch.Tensor]] = {name: [] for name in attention_names}
    queries: dict[str, torch.Tensor] = {}
    text_lengths: dict[str, int] = {}
    handles = []

    def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1], heads, x.shape[2] // heads).transpose(1, 2).float()

    try:
        for name in attention_names:
            attention = module(pipe, name)
            if name.startswith("transformer."):
                text_first = architecture(pipe) == "flux"
                block = module(pipe, name.rpartition(".")[0])

                def on_block(_module, args, kwargs, name=name):  # noqa: ANN001, ANN202 - torch's pre-hook signature
                    context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
                    text_lengths[name] = context.shape[1]

                def on_joint(_module, args, kwargs, name=name, attention=attention, text_first=text_first):  # noqa: ANN001, ANN202
                    hidden = kwargs.get("hidden_states", args[0] if args else None)
                    context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
                    found[name].append(_joint_image_to_text(attention, text_first, text_lengths.get(name, 0), hidden,
                                                            context, kwargs.get("image_rotary_emb")))  # fmt: skip

                handles.append(block.register_forward_pre_hook(on_block, with_kwargs=True))
                handles.append(attention.register_forward_pre_hook(on_joint, with_kwargs=True))
                continue
            if getattr(attention, "norm_q", None) is not None or getattr(attention, "norm_k", None) is not None:
                raise ValueError(f"{name} normalises its queries or keys: its probabilities are not q k^T")

            def on_query(_module, _inputs, output, name=name):  # noqa: ANN001, ANN202 - torch's forward hook signature
                queries[name] = output

            def on_key(_module, _inputs, output, name=name, attention=attention):  # noqa: ANN001, ANN202
                q, k = split_heads(queries.pop(name), attention.heads), split_heads(output, attention.heads)
                found[name].append((q @ k.transpose(-1, -2) * attention.scale).softmax(dim=-1))

            handles.append(attention.to_q.register_forward_hook(on_query))
            handles.append(attention.to_k.register_forward_hook(on_key))
        yield found
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def intervene(pipe: Pipeline, edits: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
    """Replace the outputs of the named modules by ``edit(output)`` during the ``with`` block (of a tuple output, the
    tokens :func:`capture` records)."""
    handles = []
    try:
        for name, edit in edits.items():
            stream = _stream(name)

            def hook(_module, _inputs, output, edit=edit, stream=stream):  # noqa: ANN001, ANN202 - torch's hook
                return _with_tokens(stream, output, edit(_output_tokens(stream, output)))

            # first among the module's hooks: transformers 5 records ``hidden_states`` (SDXL reads the penultimate)
            # with forward hooks installed on first use, which must see the edited output
            handles.append(module(pipe, name).register_forward_hook(hook, prepend=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def text_activations(pipe: Pipeline, hook: str, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """The residual stream at a text-encoder hook point, ``(len(prompts), tokens, width)`` float32 on the CPU, for
    the prompts exactly as generation encodes them (padded to the encoder's full length)."""
    if not hook.startswith("text_encoder"):
        raise ValueError(f"{hook!r} is not a text-encoder hook point")
    hook_point(pipe, hook)
    prompts, chunks = list(prompts), []
    for start in range(0, len(prompts), batch_size):
        with capture(pipe, [hook]) as got:
            encode_prompts(pipe, prompts[start : start + batch_size])
        chunks.append(got[hook][0].float().cpu())
    return torch.cat(chunks)


@torch.no_grad()
def unet_activations(
    pipe: Pipeline,
    hook: str,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    batch_size: int = 8,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A denoiser hook point's output at every sampling step of each (prompt, seed), conditional half only: a UNet
    transformer block's, or an SD3/Flux transformer block's image tokens.

    Returns ``(activations, timesteps)``: ``(len(prompts), K, tokens, C)`` float32 on the CPU (a UNet's spatial
    positions, or the transformer's image tokens) and the ``(K,)`` timesteps of the K denoiser calls, as the denoiser
    receives them (Flux's divided by 1000). Classifier-free guidance runs the unconditional and the conditional batch
    together (``[uncond, cond]``, as diffusers' pipelines concatenate them); only the conditional half is kept (Flux
    embeds its guidance: one batch).
    """
    if not is_denoiser_hook(hook):
        raise ValueError(f"{hook!r} is not a UNet or transformer hook point")
    point = hook_point(pipe, hook)
    prompts = list(prompts)
    calls: list[torch.Tensor] = []
    times: list[torch.Tensor] = []
    count = {"n": 0}

    def record_timestep(_module, args, kwargs):  # noqa: ANN001, ANN202 - torch's forward pre-hook signature
        times.append(_timestep(args, kwargs).float())

    stream = _stream(hook)

    def record_output(_module, _inputs, output):  # noqa: ANN001, ANN202 - torch's forward hook signature
        hidden = _output_tokens(stream, output)
        hidden = hidden[-count["n"] :]  # the conditional half ([uncond, cond]), or all without guidance
        calls.append(_as_tokens(hidden.detach().float().cpu()))

    handles = [
        denoiser(pipe).register_forward_pre_hook(record_timestep, with_kwargs=True),
        point.register_forward_hook(record_output),
    ]
    activations, timesteps = [], None
    try:
        batches = range(0, len(prompts), batch_size)
        for start in tqdm(batches, desc="activations", unit="batch", disable=not progress):
            chunk = prompts[start : start + batch_size]
            count["n"], calls[:], times[:] = len(chunk), [], []
            generate(pipe, chunk, seeds[start : start + batch_size], steps=steps, guidance=guidance,
                     batch_size=batch_size, progress=False)  # fmt: skip
            activations.append(torch.stack(calls, dim=1))
            found = torch.stack(times)
            if timesteps is not None and not torch.equal(found, timesteps):
                raise RuntimeError("the sampler's timesteps differ between batches")
            timesteps = found
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(activations), timesteps


def add_output_edit(
    pipe: Pipeline, name: str, edit: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
) -> HookHandles:
    """Replace a hook point's output by ``edit(tokens, timestep)`` until the returned handle is removed.

    ``tokens`` is the output as ``(batch, tokens, width)``: a text encoder's as it is, a UNet transformer block's
    ``(B, C, H, W)`` with each spatial position a token, an SD3/Flux block's image tokens (both halves of
    classifier-free guidance's batch), and the edit returns the same shape. ``timestep`` is the denoiser's current
    timestep for a denoiser hook point (recorded by a forward pre-hook on it) and ``None`` for a text-encoder one.
    """
    point = hook_point(pipe, name)
    state: dict[str, torch.Tensor | None] = {"t": None}

    def record_timestep(_module, args, kwargs):  # noqa: ANN001, ANN202 - torch's forward pre-hook signature
        state["t"] = _timestep(args, kwargs)

    def edited(hidden: torch.Tensor) -> torch.Tensor:
        out = edit(_as_tokens(hidden), state["t"])
        return out.transpose(1, 2).reshape(hidden.shape) if hidden.dim() == 4 else out

    stream = _stream(name)

    def apply(_module, _inputs, output):  # noqa: ANN001, ANN202 - torch's forward hook signature
        return _with_tokens(stream, output, edited(_output_tokens(stream, output)))

    def register(handles: list) -> None:
        if is_denoiser_hook(name):
            handles.append(denoiser(pipe).register_forward_pre_hook(record_timestep, with_kwargs=True))
        handles.append(point.register_forward_hook(apply, prepend=True))  # first, as in intervene()

    return _install(register)


def add_prompt_scaled_lora(
    pipe: Pipeline,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    scale_of: Callable[[torch.Tensor, list[torch.Tensor | None]], torch.Tensor],
    guidance_halves: Callable[[], bool],
) -> HookHandles:
    """Add a low-rank change to named Linears, its strength set per prompt, until the handle is removed.

    Each Linear ``W`` in ``factors`` (name -> ``(A, B)``) computes ``W x + s B A x``, with ``s`` the strength of the
    prompt that conditions the image: ``scale_of(embeddings, token_ids)`` on the conditional prompts of the UNet's
    batch (``(n, tokens, width)`` text embeddings as the UNet receives them, and each prompt's token ids where the
    text encoder the denoiser reads as it is (:func:`text.verbatim_stream`: CLIP, SD3/Flux's T5; none on SDXL) made
    that embedding's rows in this process, else ``None``, e.g. an embedding passed in directly) returns
    ``(n,)`` strengths, or ``(n, G)``: then the rank is G equal blocks (adapters added together), ``B_g A_g`` scaled
    by the prompt's strength g. ``guidance_halves()`` says whether the UNet's batch is classifier-free guidance's
    [unconditional; conditional] halves; the unconditional half then takes the strength of its conditional partner,
    so a prompt's whole guided prediction is scaled as one. A UNet forward pre-hook computes the strengths, forward
    hooks on the Linears add the change; the text encoder's forward hook remembers which token ids made which
    embedding. Linears inside transformer blocks only (their inputs are batch-first). On SD3/Flux the UNet's text
    input is the transformer's ``encoder_hidden_states``, the text tokens its joint attention reads.
    """
    modules = {name: module(pipe, name) for name in factors}
    for name, layer in modules.items():
        if not isinstance(layer, torch.nn.Linear):
            raise ValueError(f"{name} is a {type(layer).__name__}, not a Linear")
        lora_a, lora_b = factors[name]
        if lora_a.shape[1] != layer.in_features or lora_b.shape[0] != layer.out_features:
            raise ValueError(f"the change of {name} does not fit its weight {tuple(layer.weight.shape)}")
    stream = verbatim_stream(pipe)  # the encoder whose output rows the denoiser reads as they are, and where
    rows_read = slice(stream[1].offset, stream[1].offset + stream[1].length) if stream is not None else None
    token_ids: OrderedDict[bytes, torch.Tensor] = OrderedDict()
    state: dict[str, torch.Tensor | None] = {"scale": None}

    def digest(row: torch.Tensor) -> bytes:
        return hashlib.sha1(row.detach().float().cpu().contiguous().numpy().tobytes()).digest()

    def remember_tokens(_module, args, kwargs, output):  # noqa: ANN001, ANN202 - torch's forward hook signature
        ids = args[0] if args else kwargs.get("input_ids")
        hidden = output[0]
        if ids is None or hidden.dim() != 3:
            return
        for row_ids, row in zip(ids, hidden, strict=True):
            token_ids[digest(row)] = row_ids.detach().cpu()
            if len(token_ids) > 4096:
                token_ids.popitem(last=False)

    def set_strengths(_module, args, kwargs):  # noqa: ANN001, ANN202 - torch's forward pre-hook signature
        text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[2]
        halves = guidance_halves() and text.shape[0] % 2 == 0
        conditional = text[text.shape[0] // 2 :] if halves else text
        rows = conditional if stream is None else conditional[:, rows_read]
        strengths = scale_of(conditional.float(), [token_ids.get(digest(row)) for row in rows])
        strengths = strengths.reshape(conditional.shape[0], -1).float()  # (prompts, groups)
        state["scale"] = torch.cat([strengths, strengths]) if halves else strengths

    def add_change(name: str):  # noqa: ANN202
        lora_a, lora_b = factors[name]

        def hook(_module, inputs, output):  # noqa: ANN001, ANN202 - torch's forward hook signature
            scale = state["scale"]
            if scale is None or output.shape[0] != scale.shape[0] or lora_a.shape[0] % scale.shape[1]:
                raise RuntimeError(f"{name}: no per-prompt strength for a batch of {tuple(output.shape)}")
            a, b = lora_a.to(output.device, output.dtype), lora_b.to(output.device, output.dtype)
            hidden = torch.nn.functional.linear(inputs[0], a)  # (rows, ..., rank)
            scale = scale.to(output.device, output.dtype).repeat_interleave(a.shape[0] // scale.shape[1], dim=1)
            hidden = hidden * scale.view(scale.shape[0], *[1] * (hidden.dim() - 2), scale.shape[1])
            return output + torch.nn.functional.linear(hidden, b)

        return hook

    def register(handles: list) -> None:
        handles.append(denoiser(pipe).register_forward_pre_hook(set_strengths, with_kwargs=True))
        if stream is not None:
            handles.append(stream[0].register_forward_hook(remember_tokens, with_kwargs=True))
        for name, layer in modules.items():
            handles.append(layer.register_forward_hook(add_change(name)))

    return _install(register)
