"""The CLIP scorer that every evaluation in the toolkit goes through.

One interface, two backends:

* a ``transformers.CLIPModel`` folder (``config.json``, weights, tokenizer files, ``preprocessor_config.json``), such
  as the project's own micro CLIP (``"micro"``); images are preprocessed in torch, on whole batches, from the folder's
  ``CLIPImageProcessor`` settings, and prompts go through :func:`pipelines.tokenizer.clean_prompt` first so the ids
  equal CLIP's reference tokenizer's;
* an open_clip model (``"open_clip:ViT-L-14/openai"``), loaded with ``open_clip.create_model_and_transforms`` and
  used with open_clip's own preprocessing and tokenizer.

All embeddings are L2-normalised, computed in batches under ``torch.inference_mode`` and returned as float32 on the
CPU whatever the model's device and dtype, so downstream metrics do not depend on where the model ran.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from pipelines import world_file
from pipelines.checks import error_line
from pipelines.hub import hub_error, hub_offline, hub_unreachable
from pipelines.tokenizer import clean_prompt

__all__ = [
    "DEFAULT_HUB_SCORER",
    "DEFAULT_TEMPLATES",
    "TEMPLATES",
    "ClipScorer",
    "ImageBatch",
    "ZeroShotResult",
    "default_scorer",
    "load_scoring",
]

#: The scorer of models that ship none (needs the hub once, then its cache).
DEFAULT_HUB_SCORER = "open_clip:ViT-L-14/openai"

#: What a script's user passes instead of a hub-served scorer, to work without the hub.
SCORER_INSTEAD = "--scorer with a local CLIP folder"

logger = logging.getLogger(__name__)

#: What the scorer accepts as images: a sequence of PIL images (any mode, converted to RGB) or of ``(H, W, 3)`` arrays,
#: or one array of shape ``(N, H, W, 3)`` or ``(H, W, 3)``; arrays are uint8 in [0, 255] or floating point in [0, 1]
#: (diffusers' ``output_type="np"``).
ImageBatch = Sequence[Image.Image] | Sequence[np.ndarray] | np.ndarray

#: Zero-shot prompt templates per concept category; ``{}`` is replaced by the label. The class embedding is the
#: normalised mean of the template embeddings (prompt ensembling, Radford et al. 2021, sec. 3.1.4).
TEMPLATES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        # Phrasings both a web-trained CLIP and the micro CLIP (trained on the micro world's captions) read naturally.
        "object": ("a {}", "a picture of a {}", "an image of a {}", "a photo of a {}"),
        "colour": ("something {}", "a {} shape", "a {} object", "a {} thing"),
        "style": ("a painting in the style of {}", "a {} painting", "in the style of {}", "{} style"),
    }
)
DEFAULT_TEMPLATES: tuple[str, ...] = TEMPLATES["object"]

_OPEN_CLIP_PREFIX = "open_clip:"
_OPEN_CLIP_PRECISION = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class ZeroShotResult:
    """Zero-shot classification of ``N`` images over ``C`` labels.

    ``probs[i, c]`` is the softmax over labels of ``logit_scale * cos(image_i, class_c)``, with the model's own
    learned ``logit_scale``; ``indices[i]`` is its argmax and ``predictions[i] == labels[indices[i]]``.
    """

    labels: tuple[str, ...]
    indices: torch.Tensor
    predictions: tuple[str, ...]
    probs: torch.Tensor


class _Backend(Protocol):
    logit_scale: float

    def encode_images(self, images: list[np.ndarray]) -> torch.Tensor: ...

    def encode_texts(self, texts: list[str]) -> torch.Tensor: ...


# --------------------------------------------------------------------------------------------------------------------
# Image input handling
# --------------------------------------------------------------------------------------------------------------------


def _as_uint8_array(array: np.ndarray) -> np.ndarray:
    if np.issubdtype(array.dtype, np.floating):
        # Same conversion as diffusers' numpy_to_pil, so scores of "np" and "pil" pipeline outputs agree.
        return (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    if array.dtype != np.uint8:
        raise TypeError(f"expected uint8 or floating point images, got dtype {array.dtype}")
    return array


def _as_uint8_images(images: ImageBatch) -> list[np.ndarray]:
    """Images as a list of ``(H, W, 3)`` uint8 arrays (views where possible, no copies of the whole batch)."""
    if isinstance(images, np.ndarray):
        array = images[None] if images.ndim == 3 else images
        if array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"expected images of shape (N, H, W, 3) or (H, W, 3), got {images.shape}")
        return list(_as_uint8_array(array))
    if isinstance(images, Image.Image):
        raise TypeError("expected a sequence of images, got a single PIL image; wrap it in a list")
    out = []
    for image in images:
        if isinstance(image, Image.Image):
            out.append(np.asarray(image.convert("RGB")))
        elif isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[-1] == 3:
            out.append(_as_uint8_array(image))
        else:
            raise TypeError(f"expected PIL images or (H, W, 3) arrays, got {type(image).__name__}")
    return out


def _size_field(size: object, key: str) -> int | None:
    # transformers 5 stores sizes as SizeDict (attributes); older configs and versions use plain dicts.
    if size is None:
        return None
    if isinstance(size, Mapping):
        return size.get(key)
    return getattr(size, key, None)


class _ClipImageTransform:
    """``CLIPImageProcessor``'s pipeline in torch on batches: shortest-edge resize, centre crop, rescale, normalise."""

    def __init__(self, processor_dir: Path) -> None:
        from torchvision.transforms import InterpolationMode
        from transformers import CLIPImageProcessor

        processor = CLIPImageProcessor.from_pretrained(str(processor_dir), local_files_only=True)
        self.do_resize = bool(processor.do_resize)
        self.shortest_edge = _size_field(processor.size, "shortest_edge")
        self.resize_hw = (_size_field(processor.size, "height"), _size_field(processor.size, "width"))
        if self.do_resize and self.shortest_edge is None and None in self.resize_hw:
            raise ValueError(f"unsupported resize size in {processor_dir}: {processor.size}")
        self.do_center_crop = bool(processor.do_center_crop)
        self.crop_hw = (_size_field(processor.crop_size, "height"), _size_field(processor.crop_size, "width"))
        resample = int(processor.resample) if processor.resample is not None else 3
        # PIL resample codes; LANCZOS/BOX/HAMMING have no tensor kernel, bicubic is the closest and CLIP's own.
        modes = {0: InterpolationMode.NEAREST, 2: InterpolationMode.BILINEAR, 3: InterpolationMode.BICUBIC}
        if resample not in modes:
            logger.warning("resample=%d has no torch equivalent; using bicubic", resample)
        self.interpolation = modes.get(resample, InterpolationMode.BICUBIC)
        self.rescale_factor = float(processor.rescale_factor) if processor.do_rescale else 1.0
        self.mean = torch.tensor(processor.image_mean if processor.do_normalize else (0.0, 0.0, 0.0)).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.image_std if processor.do_normalize else (1.0, 1.0, 1.0)).view(1, 3, 1, 1)

    def _resize_crop(self, batch: torch.Tensor) -> torch.Tensor:
        import torchvision.transforms.v2.functional as TF

        height, width = batch.shape[-2:]
        if self.do_resize:
            if self.shortest_edge is not None:
                # Same output size rule as transformers' get_resize_output_image_size(default_to_square=False).
                short, long = (height, width) if height <= width else (width, height)
                new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
                size = [new_short, new_long] if height <= width else [new_long, new_short]
            else:
                size = list(self.resize_hw)
            if size != [height, width]:
                # On uint8 input, torchvision rounds and clamps like transformers' torchvision backend does.
                batch = TF.resize(batch, size, interpolation=self.interpolation, antialias=True)
        if self.do_center_crop:
            batch = TF.center_crop(batch, list(self.crop_hw))
        return batch

    def __call__(self, images: list[np.ndarray], device: torch.device | None = None) -> torch.Tensor:
        """Normalised pixel values ``(N, 3, H', W')``, float32 on ``device``, from uint8 ``(H, W, 3)`` arrays.

        The uint8 batch moves to ``device`` before resizing, so large generations are resized on the accelerator.
        """
        if all(image.shape == images[0].shape for image in images):
            batch = self._resize_crop(torch.from_numpy(np.stack(images)).to(device).permute(0, 3, 1, 2))
        else:
            batch = torch.cat(
                [self._resize_crop(torch.tensor(im, device=device).permute(2, 0, 1)[None]) for im in images]
            )
        pixels = batch.float() * self.rescale_factor
        return (pixels - self.mean.to(pixels.device)) / self.std.to(pixels.device)


# --------------------------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------------------------


def _pooled(output: object) -> torch.Tensor:
    # transformers 5 returns a BaseModelOutputWithPooling whose pooler_output holds the projected features; 4.x
    # returned the tensor itself.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class _TransformersBackend:
    def __init__(self, path: Path, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import CLIPModel, CLIPTokenizer

        self.device, self.dtype = device, dtype
        # transformers 5 loads in the saved dtype (the micro CLIP ships fp16); ask for the scoring dtype explicitly.
        model = CLIPModel.from_pretrained(str(path), dtype=dtype, local_files_only=True)
        self.model = model.to(device=device, dtype=dtype).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
        self.context_length = min(
            int(self.tokenizer.model_max_length), int(self.model.config.text_config.max_position_embeddings)
        )
        self.transform = _ClipImageTransform(path)
        self.logit_scale = float(self.model.logit_scale.detach().float().exp())

    def encode_images(self, images: list[np.ndarray]) -> torch.Tensor:
        pixels = self.transform(images, self.device).to(dtype=self.dtype)
        return _pooled(self.model.get_image_features(pixel_values=pixels))

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            [clean_prompt(text) for text in texts],
            padding="max_length",
            max_length=self.context_length,
            truncation=True,
            return_tensors="pt",
        ).to(self.device)
        output = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return _pooled(output)


class _OpenClipBackend:
    def __init__(self, model_name: str, pretrained: str | None, device: torch.device, dtype: torch.dtype) -> None:
        import open_clip

        if dtype not in _OPEN_CLIP_PRECISION:
            raise ValueError(f"open_clip supports dtypes {list(_OPEN_CLIP_PRECISION)}, got {dtype}")
        self.device, self.dtype = device, dtype
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=device, precision=_OPEN_CLIP_PRECISION[dtype]
        )
        self.model = model.eval()
        self.preprocess: Callable[[Image.Image], torch.Tensor] = preprocess
        # Built-in model names resolve to SimpleTokenizer from the packaged BPE file: no network.
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.logit_scale = float(self.model.logit_scale.detach().float().exp())

    def encode_images(self, images: list[np.ndarray]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(Image.fromarray(image)) for image in images])
        return self.model.encode_image(pixels.to(device=self.device, dtype=self.dtype))

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        # open_clip's tokenizer applies CLIP's own cleaning (ftfy, html unescape, whitespace), so texts go in raw.
        return self.model.encode_text(self.tokenizer(list(texts)).to(self.device))


def _check_open_clip_spec(model_name: str, pretrained: str | None) -> None:
    """Refuse, before anything loads, an unknown open_clip model and a local checkpoint that is not safetensors
    (open_clip would ``torch.load``, i.e. unpickle, it).

    Mirrors open_clip's own reading of ``pretrained``: a tag it knows for ``model_name`` first, else a file path
    (a ``.safetensors`` name is read with safetensors, anything else with ``torch.load``).
    """
    import open_clip

    if ":" not in model_name and model_name.replace("/", "-") not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model_name!r} (open_clip.list_models() names the known ones)")
    if pretrained is None or open_clip.get_pretrained_cfg(model_name, pretrained) or not os.path.isfile(pretrained):
        return  # a known tag (open_clip's own source), or neither tag nor file: open_clip says so itself
    if not str(pretrained).endswith(".safetensors"):
        raise ValueError(
            f"refusing to load the open_clip checkpoint {pretrained}: only .safetensors files are read (other "
            "formats are pickles, which can run code as they load); convert it to safetensors first"
        )


def _open_clip_cached(repo_id: str, filename: str) -> bool:
    """Whether open_clip's weights file for a hub-served tag, or the safetensors file it tries first, is in the
    local hub cache."""
    from huggingface_hub import try_to_load_from_cache

    names = [filename]
    if filename == "open_clip_pytorch_model.bin":
        names.append("open_clip_model.safetensors")
    elif filename.endswith((".bin", ".pth")):
        names.append(filename[:-4] + ".safetensors")
    return any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in names)


def _check_open_clip_download(model_name: str, pretrained: str | None) -> None:
    """``HubUnreachableError`` in one line, within seconds, when a pretrained tag's weights must come from the hub
    and it cannot be reached (:func:`pipelines.hub.hub_unreachable`): open_clip itself would retry the download
    several times with growing waits. Weights already cached load with ``HF_HUB_OFFLINE=1``, which open_clip's
    downloads honour; without it they are tried online first, so the error then names that setting. In offline mode
    weights that are not cached are the same one line (open_clip's own error asks to check the connection)."""
    import open_clip

    if pretrained is None:
        return
    hub_file = open_clip.get_pretrained_cfg(model_name, pretrained).get("hf_hub", "")
    if not hub_file:
        return  # a local file or a tag open_clip does not know
    repo_id, filename = os.path.split(hub_file)
    cached = _open_clip_cached(repo_id, filename or "open_clip_pytorch_model.bin")
    reason = None if hub_offline() else hub_unreachable()
    if (hub_offline() and not cached) or reason is not None:
        what = f"the CLIP scorer 'open_clip:{model_name}/{pretrained}'"
        raise hub_error(what, reason, cached=cached, instead=SCORER_INSTEAD)


# --------------------------------------------------------------------------------------------------------------------
# Scorer
# --------------------------------------------------------------------------------------------------------------------


class ClipScorer:
    """CLIP embeddings and the scores built on them, over a transformers or an open_clip model.

    Build one with :meth:`from_pretrained` (or :meth:`from_transformers` / :meth:`from_open_clip`). Every method
    works in batches of ``batch_size`` under ``torch.inference_mode`` and returns float32 CPU tensors.
    """

    def __init__(self, backend: _Backend, *, batch_size: int = 64, progress: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._backend = backend
        self.batch_size = batch_size
        self.progress = progress

    # ---- construction ----------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 64,
        progress: bool = True,
    ) -> ClipScorer:
        """Load a scorer from one of:

        * ``"micro"``: the project's shipped micro CLIP (``evals.microworld.clip.micro_clip_path()``);
        * a local folder holding a ``transformers.CLIPModel`` (``config.json`` with ``model_type == "clip"``);
        * ``"open_clip:NAME/PRETRAINED"``, e.g. ``"open_clip:ViT-L-14/openai"``, or with a local checkpoint,
          ``"open_clip:ViT-L-14//abs/path/to/weights.bin"`` (everything after the first ``/`` is ``pretrained``).
          A pretrained tag is required here so a typo cannot silently score with random weights; use
          :meth:`from_open_clip` with ``pretrained=None`` for an untrained model.

        Local models never touch the network.
        """
        kwargs = dict(device=device, dtype=dtype, batch_size=batch_size, progress=progress)
        spec = str(name_or_path)
        if spec == "micro":
            try:
                from .microworld.clip import micro_clip_path
            except ImportError as err:
                raise RuntimeError(
                    "the micro CLIP is not available: evals.microworld.clip could not be imported"
                ) from err
            return cls.from_transformers(micro_clip_path(), **kwargs)
        if spec.startswith(_OPEN_CLIP_PREFIX):
            model_name, _, pretrained = spec[len(_OPEN_CLIP_PREFIX) :].partition("/")
            if not model_name or not pretrained:
                raise ValueError(
                    f"expected 'open_clip:NAME/PRETRAINED' (e.g. 'open_clip:ViT-L-14/openai'), got {spec!r}"
                )
            return cls.from_open_clip(model_name, pretrained, **kwargs)
        path = Path(spec)
        if (path / "config.json").is_file():
            return cls.from_transformers(path, **kwargs)
        raise ValueError(
            f"cannot load a CLIP scorer from {spec!r}: expected 'micro', a local transformers CLIPModel folder "
            "or 'open_clip:NAME/PRETRAINED'"
        )

    @classmethod
    def from_transformers(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 64,
        progress: bool = True,
    ) -> ClipScorer:
        """A scorer over a local ``transformers.CLIPModel`` folder (model, tokenizer and preprocessor config)."""
        path = Path(path)
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        if config.get("model_type") != "clip":
            raise ValueError(f"{path} does not hold a CLIPModel (model_type={config.get('model_type')!r})")
        logger.info("loading transformers CLIP from %s on %s (%s)", path, device, dtype)
        backend = _TransformersBackend(path, torch.device(device), dtype)
        return cls(backend, batch_size=batch_size, progress=progress)

    @classmethod
    def from_open_clip(
        cls,
        model_name: str,
        pretrained: str | None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 64,
        progress: bool = True,
    ) -> ClipScorer:
        """A scorer over ``open_clip.create_model_and_transforms(model_name, pretrained=pretrained)``.

        ``pretrained`` is an open_clip tag (downloads unless cached) or a local ``.safetensors`` checkpoint; other
        local files (``.bin``, ``.pt``: pickles, which can run code as they load) are refused with ``ValueError``
        before anything loads, and so is a tag whose weights need the hub when it cannot be reached
        (``pipelines.HubUnreachableError``, one line). ``None`` gives random weights, useful only for tests.
        """
        _check_open_clip_spec(model_name, pretrained)
        _check_open_clip_download(model_name, pretrained)
        if pretrained is None:
            logger.warning("open_clip model %s has random weights: its scores are meaningless", model_name)
        logger.info("loading open_clip %s (pretrained=%s) on %s (%s)", model_name, pretrained, device, dtype)
        backend = _OpenClipBackend(model_name, pretrained, torch.device(device), dtype)
        return cls(backend, batch_size=batch_size, progress=progress)

    # ---- embeddings ------------------------------------------------------------------------------------------------

    @property
    def logit_scale(self) -> float:
        """The model's learned softmax temperature ``exp(logit_scale)`` (100 for OpenAI's CLIP)."""
        return self._backend.logit_scale

    def _chunks(self, n: int, desc: str) -> Iterator[slice]:
        starts = range(0, n, self.batch_size)
        for start in tqdm(starts, desc=desc, unit="batch", disable=not self.progress or len(starts) <= 1):
            yield slice(start, start + self.batch_size)

    def image_embeddings(self, images: ImageBatch) -> torch.Tensor:
        """L2-normalised image embeddings, ``(N, D)`` float32 on the CPU."""
        arrays = _as_uint8_images(images)
        out = []
        with torch.inference_mode():
            for chunk in self._chunks(len(arrays), "CLIP images"):
                out.append(F.normalize(self._backend.encode_images(arrays[chunk]).float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0, 0)

    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings, ``(N, D)`` float32 on the CPU; texts past the context are truncated."""
        if isinstance(texts, str):
            raise TypeError("expected a sequence of texts, got a single string; wrap it in a list")
        texts = list(texts)
        out = []
        with torch.inference_mode():
            for chunk in self._chunks(len(texts), "CLIP texts"):
                out.append(F.normalize(self._backend.encode_texts(texts[chunk]).float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0, 0)

    def class_embeddings(self, labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
        """One embedding per label: the L2-normalised mean of its normalised template embeddings, ``(C, D)``."""
        if not labels or not templates:
            raise ValueError("labels and templates must be non-empty")
        bad = [template for template in templates if "{}" not in template]
        if bad:
            raise ValueError(f"templates need a '{{}}' placeholder for the label: {bad}")
        # str.replace, not str.format: labels and templates may contain other braces.
        texts = [template.replace("{}", label) for label in labels for template in templates]
        embeddings = self.text_embeddings(texts).view(len(labels), len(templates), -1)
        return F.normalize(embeddings.mean(dim=1), dim=-1)

    # ---- metrics ---------------------------------------------------------------------------------------------------

    def clip_score(self, images: ImageBatch, texts: Sequence[str] | str) -> torch.Tensor:
        """CLIPScore of each (image, text) pair: ``100 * max(cos(E_image, E_text), 0)``, shape ``(N,)``.

        This is CLIP-S of Hessel et al. 2021 (arXiv:2104.08718) with weight ``w = 100`` instead of the paper's 2.5, the
        scaling torchmetrics and most text-to-image papers report. ``texts`` is one text per image, or a single
        string scored against every image.
        """
        image_emb = self.image_embeddings(images)
        text_emb = self.text_embeddings([texts] if isinstance(texts, str) else texts)
        if text_emb.shape[0] == 1:
            text_emb = text_emb.expand_as(image_emb)
        if text_emb.shape[0] != image_emb.shape[0]:
            raise ValueError(f"got {image_emb.shape[0]} images but {text_emb.shape[0]} texts")
        return 100.0 * (image_emb * text_emb).sum(dim=-1).clamp(min=0.0)

    def image_similarity(self, images_a: ImageBatch, images_b: ImageBatch) -> torch.Tensor:
        """Cosine similarity of the CLIP image embeddings of each pair ``(images_a[i], images_b[i])``: ``(N,)``."""
        emb_a, emb_b = self.image_embeddings(images_a), self.image_embeddings(images_b)
        if emb_a.shape[0] != emb_b.shape[0]:
            raise ValueError(f"got {emb_a.shape[0]} and {emb_b.shape[0]} images; pairs need equal counts")
        return (emb_a * emb_b).sum(dim=-1)

    def zero_shot(
        self, images: ImageBatch, labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES
    ) -> ZeroShotResult:
        """Zero-shot classify each image among ``labels`` with prompt-ensembled class embeddings.

        ``probs = softmax(logit_scale * image_emb @ class_emb.T)`` over labels, ``class_emb`` from
        :meth:`class_embeddings`; the prediction is the argmax (ties go to the first label).
        """
        labels = tuple(labels)
        class_emb = self.class_embeddings(labels, templates)
        image_emb = self.image_embeddings(images)
        probs = (self.logit_scale * image_emb @ class_emb.T).softmax(dim=-1)
        indices = probs.argmax(dim=-1)
        return ZeroShotResult(
            labels=labels,
            indices=indices,
            predictions=tuple(labels[i] for i in indices.tolist()),
            probs=probs,
        )


def default_scorer(model: str) -> str:
    """The scorer a script uses for ``model`` unless told: the micro world's own CLIP for a model of that world
    (:func:`pipelines.world_file`; it is what reads that world), ``DEFAULT_HUB_SCORER`` for every other."""
    return "micro" if world_file(model) is not None else DEFAULT_HUB_SCORER


def load_scoring(
    model: str, scorer: str | None, *, judge: bool, device: str | torch.device = "cpu", progress: bool = False
) -> tuple[str, ClipScorer, Any]:
    """What the scripts score with: ``(scorer name, CLIP scorer, judge or None)``.

    The scorer is ``scorer`` or ``default_scorer(model)``; ``ValueError`` in one line when it cannot load. The judge
    (the micro world's ground truth) is loaded when ``judge`` is asked for and ``model`` draws the micro world.
    """
    name = scorer or default_scorer(model)
    try:
        clip = ClipScorer.from_pretrained(name, device=device, progress=progress)
    except (OSError, RuntimeError) as err:
        raise ValueError(f"cannot load the CLIP scorer {name!r}: {error_line(err)}") from None
    ground_truth = None
    if judge and world_file(model) is not None:
        from .microworld.judge import load_judge

        ground_truth = load_judge().to(device)
    return name, clip, ground_truth
