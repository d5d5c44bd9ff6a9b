"""EfficientNet-Lite2's packaged weights, mapped by position into timm, classify real images."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from asif_exp.encoders import IMAGE_MODELS, Preprocessing, vision_identity

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ASIF_DATA_ROOT", ROOT.parent / "shared" / "data"))
IMAGENET_MINI = SHARED_DATA / "imagenet_mini"


def test_lite2_config_builds_the_tf_architecture():
    cfg = OmegaConf.load(ROOT / "conf" / "encoder" / "vision" / "efficientnet_lite2.yaml")
    model = IMAGE_MODELS["efficientnet_lite2"](cfg)  # loads every tensor, or raises
    assert model.num_features == 1280 and model.num_classes == 0
    assert vision_identity(cfg)["model_name"] == "tf_efficientnet_lite2"  # part of the cache key


@pytest.mark.slow  # 200 images through Lite2 at 260 px: ~20 s on an idle 2-core CPU
@pytest.mark.skipif(
    not (IMAGENET_MINI / "labels.csv").is_file(),
    reason=f"needs the local ImageNet sample at {IMAGENET_MINI} (../shared/data or ASIF_DATA_ROOT)",
)
def test_lite2_classifier_scores_sanely_on_imagenet_images():
    """A wrong position mapping scores about 0.001; the right one about 0.8."""
    cfg = OmegaConf.load(ROOT / "conf" / "encoder" / "vision" / "efficientnet_lite2.yaml")
    model = IMAGE_MODELS["efficientnet_lite2"](cfg, with_classifier=True).eval()
    transform = Preprocessing.from_config(cfg).transform()
    with (IMAGENET_MINI / "labels.csv").open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["source"] != "one_per_class_sample"][:200]
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(rows), 50):
            batch = rows[start : start + 50]
            pixels = torch.stack(
                [transform(Image.open(IMAGENET_MINI / r["file"]).convert("RGB")) for r in batch]
            )
            predicted = model(pixels).argmax(dim=1).tolist()
            correct += sum(p == int(r["label"]) for p, r in zip(predicted, batch, strict=True))
    assert correct / len(rows) > 0.5, f"top-1 {correct / len(rows):.3f} on {len(rows)} images"
