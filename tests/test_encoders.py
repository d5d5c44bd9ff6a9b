"""The offline encoders are the real trained models, not just tensors that load."""

import csv

import pytest
import torch
from conftest import SHARED_DATA, compose_config, require_shared_data

from asif_exp.encoders import IMAGE_MODELS, ImageEncoder, Preprocessing, TextEncoder, list_encoders


def test_registry_lists_offline_and_hub_encoders():
    encoders = list_encoders()
    assert {"efficientnet_lite0", "efficientnet_lite2", "timm"} <= set(encoders["vision"])
    assert {"minilm_l6", "sentence_transformers"} <= set(encoders["text"])


def test_unknown_encoder_is_a_clear_error():
    cfg = compose_config(["encoder.vision.name=nope"]).encoder.vision
    with pytest.raises(ValueError, match="name='nope' is not registered"):
        ImageEncoder(cfg, "cpu")


def test_bad_interpolation_is_a_clear_error():
    with pytest.raises(ValueError, match="interpolation='cubic'"):
        Preprocessing(interpolation="cubic").transform()


def test_efficientnet_lite0_classifies_imagenet():
    """The state-dict mapping is right only if the classifier is actually good on real images."""
    root = require_shared_data("imagenet_mini", "samples")
    cfg = compose_config([]).encoder.vision
    model = IMAGE_MODELS["efficientnet_lite0"](cfg, with_classifier=True).eval()
    transform = Preprocessing.from_config(cfg).transform()
    with open(SHARED_DATA / "imagenet_mini" / "labels.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["file"].startswith("samples/")][::5][:200]
    from PIL import Image

    correct = 0
    for start in range(0, len(rows), 50):
        batch = rows[start : start + 50]
        pixels = torch.stack(
            [transform(Image.open(root.parent / r["file"]).convert("RGB")) for r in batch]
        )
        with torch.inference_mode():
            predictions = model(pixels).argmax(1)
        correct += sum(int(p) == int(r["label"]) for p, r in zip(predictions, batch, strict=True))
    accuracy = correct / len(rows)
    # Measured 0.88 on these 200 images (0.81 on 600 val images); a wrong mapping scores ~0.
    assert accuracy > 0.6, f"EfficientNet-Lite0 top-1 {accuracy:.3f} on {len(rows)} images"


def test_feature_encoder_outputs_pooled_features():
    cfg = compose_config(
        ["encoder.vision.crop_size=64", "encoder.vision.resize_size=64"]
    ).encoder.vision
    encoder = ImageEncoder(cfg, "cpu")
    features = encoder.encode_pixels(torch.randn(2, 3, 64, 64))
    assert features.shape == (2, 1280) and features.dtype == torch.float32


def test_minilm_embeds_meaning():
    encoder = TextEncoder(compose_config([]).encoder.text, "cpu")
    a, b, c = encoder.encode(["a photo of a dog", "a picture of a puppy", "a spreadsheet of taxes"])
    cos = torch.nn.functional.cosine_similarity
    assert a.shape == (384,)
    assert cos(a, b, dim=0) > cos(a, c, dim=0) + 0.2
