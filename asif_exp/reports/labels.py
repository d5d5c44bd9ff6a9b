"""Display names of encoders and benchmarks, number formats and markdown tables, shared by
every report."""

from __future__ import annotations

import math

import pandas as pd

BENCHMARK_LABELS = {
    "imagenet": "ImageNet",
    "cifar100": "CIFAR-100",
    "oxford_pets": "Pets",
    "imagenet_v2": "ImageNet-v2",
    "cifar10": "CIFAR-10",
    "imagenet_mini": "ImageNet-mini",
    "synthetic_shapes": "Shapes",
}
ENCODER_LABELS = {
    "vit_base_patch16_224_miil.in21k": "ViT-B/16 sup. IN-21k (MIIL)",
    "vit_base_patch16_224.augreg_in21k": "ViT-B/16 sup. IN-21k (AugReg)",
    "vit_small_patch8_224.dino": "DINO ViT-S/8 unsup.",
    "efficientnet_lite0": "EfficientNet-Lite0",
    "tf_efficientnet_lite0": "EfficientNet-Lite0",
    "efficientnet_lite2": "EfficientNet-Lite2",
    "tf_efficientnet_lite2": "EfficientNet-Lite2",
    "sentence-transformers/sentence-t5-base": "sentence-T5-base",
    "sentence-transformers/all-mpnet-base-v2": "all-mpnet-base-v2",
    "sentence-transformers/all-MiniLM-L6-v2": "all-MiniLM-L6-v2",
}


def encoder_label(model_name: str) -> str:
    return ENCODER_LABELS.get(model_name, model_name)


def benchmark_label(benchmark: str, subset: int = 0) -> str:
    label = BENCHMARK_LABELS.get(benchmark, benchmark)
    return f"{label} ({subset:,} subset)" if subset else label


def slug(model_name: str) -> str:
    return model_name.split("/")[-1].replace(".", "-")


def fmt(value, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub markdown table (index as the first column)."""
    header = [frame.index.name or ""] + [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for index, row in frame.iterrows():
        cells = [str(index).replace("|", "\\|")] + [str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
