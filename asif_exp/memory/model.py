"""The model artifact: an ASIF model is its anchor pairs plus k, p and the options.

`AsifModel` scores as the grid does (the same scoring core), is edited without retraining
(`keep`, `remove`, `add`: each returns a new model) and is saved and loaded as a checked
directory (`save_model`, `load_model`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from asif_exp.embeddings import file_sha256, save_tensors
from asif_exp.errors import ModelFormatError
from asif_exp.methods.asif import (
    AsifOptions,
    ModelScores,
    TopK,
    model_scores,
    relative_representation,
    streaming_topk,
)
from asif_exp.problem import Targets
from asif_exp.tasks.classification import classification_metrics
from asif_exp.tensors import check_embeddings, unit_rows

MODEL_FORMAT = "asif_model"
MODEL_FORMAT_VERSION = 1
MODEL_META = "model.json"
MODEL_TENSORS = "anchors.safetensors"
MODEL_PAIRS = "anchors.jsonl"


@dataclass(frozen=True)
class Prompts:
    """A zero-shot task: the embedded prompts, the class of each, and the class names."""

    embeddings: Tensor  # (prompts, d_text)
    prompt_class: Tensor  # (prompts,) int64
    class_names: list[str]
    texts: list[str] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @classmethod
    def of_targets(cls, targets: Targets) -> Prompts:
        """A problem's targets as the model scores them: grouped prompts as classes, or
        ungrouped texts (captions) each its own class, as the run's method scores them."""
        if targets.groups is None:
            count = len(targets.texts)
            return cls(targets.embeddings, torch.arange(count), list(targets.texts), targets.texts)
        return cls(targets.embeddings, targets.groups, list(targets.group_names), targets.texts)


# ----------------------------------------------------------------------------- the model


@dataclass
class AsifModel:
    """Anchor pairs plus k, p and options: everything an ASIF classifier is.

    Edits return a new model; a model is never changed in place.
    """

    anchor_image_embeddings: Tensor  # (n, d_image)
    anchor_text_embeddings: Tensor  # (n, d_text)
    anchor_ids: list[str]  # image id of each pair (repeats allowed: one image, many captions)
    anchor_captions: list[str]
    k: int
    p: float
    options: AsifOptions = field(default_factory=AsifOptions)
    encoders: dict = field(default_factory=dict)  # {"vision": identity, "text": identity}

    def __post_init__(self) -> None:
        n_image, n_text = len(self.anchor_image_embeddings), len(self.anchor_text_embeddings)
        if not n_image == n_text == len(self.anchor_ids) == len(self.anchor_captions):
            raise ValueError(
                f"anchor pairs mismatch: {n_image} image embeddings, {n_text} text embeddings, "
                f"{len(self.anchor_ids)} ids, {len(self.anchor_captions)} captions"
            )
        check_embeddings("anchor image embeddings", self.anchor_image_embeddings)
        check_embeddings("anchor text embeddings", self.anchor_text_embeddings)
        if not 1 <= self.k <= self.n:
            raise ValueError(f"k={self.k}: must be between 1 and the model's n={self.n} anchors")
        if not self.p > 0:
            raise ValueError(f"p={self.p}: must be positive")

    @property
    def n(self) -> int:
        return len(self.anchor_captions)

    def memory_bytes(self) -> int:
        """Bytes held by the anchor memory: both embedding matrices plus ids and captions."""
        tensors = sum(
            t.numel() * t.element_size()
            for t in (self.anchor_image_embeddings, self.anchor_text_embeddings)
        )
        return tensors + sum(len(s.encode()) for s in self.anchor_ids + self.anchor_captions)

    # -- scoring --------------------------------------------------------------------------

    @cached_property
    def _unit_anchor_images(self) -> Tensor:
        return unit_rows(self.anchor_image_embeddings)

    @cached_property
    def _unit_anchor_texts(self) -> Tensor:
        return unit_rows(self.anchor_text_embeddings)

    def _top(self, queries: Tensor, unit_anchors: Tensor, what: str) -> TopK:
        check_embeddings(what, queries)
        return streaming_topk(
            unit_rows(queries), unit_anchors, [self.n], self.k, self.options, progress=False
        )[self.n]

    def image_representations(self, image_embeddings: Tensor) -> Tensor:
        """Sparse CSR (images x n) relative representations."""
        top = self._top(image_embeddings, self._unit_anchor_images, "image embeddings")
        normalize = self.options.normalize == "both"
        return relative_representation(top, self.k, self.p, self.options.clamp_negative, normalize)

    def prompt_representations(self, prompt_embeddings: Tensor) -> Tensor:
        top = self._top(prompt_embeddings, self._unit_anchor_texts, "prompt embeddings")
        normalize = self.options.normalize in ("both", "prompt")
        return relative_representation(top, self.k, self.p, self.options.clamp_negative, normalize)

    def score(self, image_embeddings: Tensor, prompts: Prompts) -> ModelScores:
        """Scores as the grid computes them (the same scoring core), intermediate parts kept."""
        return model_scores(
            self._top(image_embeddings, self._unit_anchor_images, "image embeddings"),
            self._top(prompts.embeddings, self._unit_anchor_texts, "prompt embeddings"),
            self.k,
            self.p,
            prompts.prompt_class,
            prompts.num_classes,
            self.options,
        )

    def scores(self, image_embeddings: Tensor, prompts: Prompts) -> Tensor:
        """(images x classes) zero-shot scores."""
        return self.score(image_embeddings, prompts).scores

    def predict(self, image_embeddings: Tensor, prompts: Prompts) -> Tensor:
        return self.scores(image_embeddings, prompts).argmax(dim=1)

    def evaluate(self, image_embeddings: Tensor, labels: Tensor, prompts: Prompts) -> dict:
        """top-1, top-5, per-class accuracy, no-overlap fraction and predictions."""
        scores = self.scores(image_embeddings, prompts)
        return classification_metrics(scores, labels.long(), prompts.num_classes)

    # -- editing --------------------------------------------------------------------------

    def matching(
        self,
        indices: Sequence[int] = (),
        ids: Sequence[str] = (),
        caption_contains: str | None = None,
        caption_regex: str | None = None,
    ) -> Tensor:
        """Boolean mask of the anchor pairs selected by any of the given criteria."""
        mask = torch.zeros(self.n, dtype=torch.bool)
        for index in indices:
            if not -self.n <= index < self.n:
                raise IndexError(f"anchor index {index} out of range for n={self.n} anchors")
            mask[index] = True
        if ids:
            wanted = set(ids)
            unknown = wanted - set(self.anchor_ids)
            if unknown:
                raise KeyError(f"anchor ids not in the model: {sorted(unknown)[:5]}")
            mask |= torch.tensor([i in wanted for i in self.anchor_ids], dtype=torch.bool)
        if caption_contains is not None:
            mask |= torch.tensor([caption_contains in c for c in self.anchor_captions])
        if caption_regex is not None:
            try:
                pattern = re.compile(caption_regex)
            except re.error as error:
                raise ValueError(f"caption regex {caption_regex!r}: {error}") from None
            mask |= torch.tensor([bool(pattern.search(c)) for c in self.anchor_captions])
        return mask

    def keep(self, mask: Tensor) -> AsifModel:
        """A model with only the pairs where `mask` is true (order kept)."""
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.shape != (self.n,):
            raise ValueError(f"mask of shape {tuple(mask.shape)} for n={self.n} anchors")
        left = int(mask.sum())
        if left < self.k:
            raise ValueError(f"the edit leaves {left} anchor pairs, fewer than k={self.k}")
        rows = mask.nonzero().flatten()
        return AsifModel(
            self.anchor_image_embeddings[rows],
            self.anchor_text_embeddings[rows],
            [self.anchor_ids[i] for i in rows.tolist()],
            [self.anchor_captions[i] for i in rows.tolist()],
            self.k,
            self.p,
            self.options,
            self.encoders,
        )

    def remove(
        self,
        indices: Sequence[int] = (),
        ids: Sequence[str] = (),
        caption_contains: str | None = None,
        caption_regex: str | None = None,
    ) -> AsifModel:
        """Drop the selected pairs. Selecting nothing is an error (most likely a typo)."""
        mask = self.matching(indices, ids, caption_contains, caption_regex)
        if not bool(mask.any()):
            raise ValueError(
                f"no anchor pair matches indices={list(indices)}, ids={list(ids)}, "
                f"caption_contains={caption_contains!r}, caption_regex={caption_regex!r}"
            )
        return self.keep(~mask)

    def add(
        self,
        image_embeddings: Tensor,
        text_embeddings: Tensor,
        ids: Sequence[str],
        captions: Sequence[str],
    ) -> AsifModel:
        """Append pairs embedded by the same encoders; pairs already held are refused."""
        for name, new, old in [
            ("image", image_embeddings, self.anchor_image_embeddings),
            ("text", text_embeddings, self.anchor_text_embeddings),
        ]:
            if new.ndim != 2 or new.shape[1] != old.shape[1]:
                raise ValueError(
                    f"new {name} embeddings of shape {tuple(new.shape)}: the model's are "
                    f"{old.shape[1]}-d"
                )
        existing = set(zip(self.anchor_ids, self.anchor_captions, strict=True))
        repeated = [pair for pair in zip(ids, captions, strict=False) if pair in existing]
        if repeated:
            raise ValueError(f"{len(repeated)} pairs already in the model, e.g. {repeated[0]}")
        return AsifModel(
            torch.cat([self.anchor_image_embeddings, image_embeddings.float()]),
            torch.cat([self.anchor_text_embeddings, text_embeddings.float()]),
            self.anchor_ids + list(ids),
            self.anchor_captions + list(captions),
            self.k,
            self.p,
            self.options,
            self.encoders,
        )

    # -- artifact -------------------------------------------------------------------------

    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write the model as a directory, atomically: a reader sees all of it or none."""
        return save_model(self, directory, overwrite)

    @classmethod
    def load(cls, directory: str | Path, device: str | None = None) -> AsifModel:
        return load_model(directory, device)


# ----------------------------------------------------------------------------- artifact


def save_model(model: AsifModel, directory: str | Path, overwrite: bool = False) -> Path:
    """Write `model` as a directory: anchors.safetensors, anchors.jsonl, model.json.

    Written into a staging directory beside the target and renamed into place, so a crash
    leaves either the old directory or the new one, never a mix.
    """
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True to replace it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f".{directory.name}.staging-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        tensors = staging / MODEL_TENSORS
        save_tensors(
            {
                "anchor_image_embeddings": model.anchor_image_embeddings.float(),
                "anchor_text_embeddings": model.anchor_text_embeddings.float(),
            },
            tensors,
        )
        pairs = staging / MODEL_PAIRS
        with pairs.open("w", encoding="utf-8") as handle:
            for anchor_id, caption in zip(model.anchor_ids, model.anchor_captions, strict=True):
                handle.write(json.dumps({"id": anchor_id, "caption": caption}) + "\n")
        meta = {
            "format": MODEL_FORMAT,
            "format_version": MODEL_FORMAT_VERSION,
            "n": model.n,
            "k": model.k,
            "p": model.p,
            "options": model.options.to_dict(),
            "encoders": model.encoders,
            "image_dim": model.anchor_image_embeddings.shape[1],
            "text_dim": model.anchor_text_embeddings.shape[1],
            "files": {
                name: {
                    "bytes": (staging / name).stat().st_size,
                    "sha256": file_sha256(staging / name),
                }
                for name in (MODEL_TENSORS, MODEL_PAIRS)
            },
        }
        (staging / MODEL_META).write_text(json.dumps(meta, indent=1))
        if directory.exists():  # overwrite: move the old one aside, then swap
            old = directory.with_name(f".{directory.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(directory, old)
            os.replace(staging, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def load_model(directory: str | Path, device: str | None = None) -> AsifModel:
    """Read a model directory, checking format, version, checksums, shapes and counts.

    `device` replaces the saved `options.device` (a model saved on a GPU machine runs anywhere).
    """
    directory = Path(directory)

    def fail(problem: str) -> ModelFormatError:
        return ModelFormatError(f"ASIF model {directory}: {problem}")

    meta_path = directory / MODEL_META
    if not meta_path.is_file():
        raise fail(f"no {MODEL_META} (not a saved ASIF model, or an incomplete copy)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise fail(f"{MODEL_META} is not valid JSON ({error})") from None
    if not isinstance(meta, dict):
        raise fail(f"{MODEL_META} is not a JSON object")
    if meta.get("format") != MODEL_FORMAT:
        raise fail(f"{MODEL_META} has format {meta.get('format')!r}, expected {MODEL_FORMAT!r}")
    if meta.get("format_version") != MODEL_FORMAT_VERSION:
        raise fail(
            f"format version {meta.get('format_version')!r}; this asif_exp reads version "
            f"{MODEL_FORMAT_VERSION}"
        )
    missing = {"n", "k", "p", "options", "encoders", "image_dim", "text_dim", "files"} - set(meta)
    if missing:
        raise fail(f"{MODEL_META} lacks {sorted(missing)}")
    files = meta["files"] if isinstance(meta["files"], dict) else {}
    for name in (MODEL_TENSORS, MODEL_PAIRS):
        path, expected = directory / name, files.get(name)
        if not isinstance(expected, dict):
            raise fail(f'{MODEL_META}: "files" lacks the size and sha256 of {name}')
        if not path.is_file():
            raise fail(f"{name} is missing")
        if path.stat().st_size != expected.get("bytes") or file_sha256(path) != expected.get(
            "sha256"
        ):
            raise fail(f"{name} does not match its recorded size and sha256 (damaged or edited)")
    tensors = load_file(str(directory / MODEL_TENSORS))
    if set(tensors) != {"anchor_image_embeddings", "anchor_text_embeddings"}:
        raise fail(f"{MODEL_TENSORS} holds tensors {sorted(tensors)}")
    images, texts = tensors["anchor_image_embeddings"], tensors["anchor_text_embeddings"]
    expected_shapes = {
        "image": (meta["n"], meta["image_dim"]),
        "text": (meta["n"], meta["text_dim"]),
    }
    for side, tensor in (("image", images), ("text", texts)):
        if tuple(tensor.shape) != expected_shapes[side]:
            raise fail(
                f"anchor {side} embeddings have shape {tuple(tensor.shape)}, "
                f"{MODEL_META} says {expected_shapes[side]}"
            )
    try:
        lines = (directory / MODEL_PAIRS).read_text(encoding="utf-8").splitlines()
        pairs = [json.loads(line) for line in lines]
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise fail(f"{MODEL_PAIRS} is not valid JSON lines ({error})") from None
    if len(pairs) != meta["n"]:
        raise fail(f"{MODEL_PAIRS} holds {len(pairs)} pairs, {MODEL_META} says n={meta['n']}")
    options = {**meta["options"], **({"device": device} if device else {})}
    try:
        return AsifModel(
            images,
            texts,
            [r["id"] for r in pairs],
            [r["caption"] for r in pairs],
            int(meta["k"]),
            float(meta["p"]),
            AsifOptions(**options),
            meta["encoders"],
        )
    except (KeyError, TypeError, ValueError) as error:
        raise fail(str(error)) from None
