"""The offline encoders are the real trained models, not just tensors that load."""

import csv
import os
import resource
import threading

import pytest
import torch
from conftest import SHARED_DATA, compose_config, require_shared_data

from asif_exp.allocator import glibc, reused_allocations
from asif_exp.embeddings import auto_num_workers, prefetched
from asif_exp.encoders import (
    IMAGE_MODELS,
    INFERENCE_FORM,
    ImageEncoder,
    Preprocessing,
    TextEncoder,
    fold_batchnorm,
    list_encoders,
    torch_threads,
    vision_identity,
)


def test_registry_lists_offline_and_hub_encoders():
    encoders = list_encoders()
    assert {"efficientnet_lite0", "efficientnet_lite2", "timm"} <= set(encoders["vision"])
    assert {"minilm_l6", "sentence_transformers"} <= set(encoders["text"])


def test_unknown_encoder_is_a_clear_error():
    cfg = compose_config(["encoder.vision.name=nope"]).encoder.vision
    with pytest.raises(ValueError, match="name='nope' is not registered"):
        ImageEncoder(cfg, "cpu")


def test_bad_interpolation_is_a_clear_error_before_any_image_is_read():
    # (at the first image, a loader would report every image as unreadable instead)
    with pytest.raises(ValueError, match="interpolation='cubic'"):
        Preprocessing(interpolation="cubic")
    cfg = compose_config(["encoder.vision.interpolation=cubic"]).encoder.vision
    with pytest.raises(ValueError, match="interpolation='cubic'"):
        ImageEncoder(cfg, "cpu")


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


class _ConvNormNet(torch.nn.Module):
    """conv -> batch norm -> ReLU, then a conv whose output a batch norm and a residual both read
    (not foldable: the residual needs the unnormalised output)."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.norm1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.norm2 = torch.nn.BatchNorm2d(8)
        self.tap = torch.nn.Identity()

    def forward(self, x):
        y = torch.relu(self.norm1(self.conv1(x)))
        z = self.conv2(y)
        return self.norm2(z) + self.tap(z)


def _randomised_statistics(model: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator))
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.randn(n, generator=generator))
            module.bias.data.copy_(torch.randn(n, generator=generator))


def test_fold_batchnorm_matches_the_unfolded_network_and_skips_shared_outputs():
    model = _ConvNormNet()
    _randomised_statistics(model)
    model.eval()
    x = torch.randn(4, 3, 10, 10)
    with torch.inference_mode():
        expected = model(x)
    assert fold_batchnorm(model, x[:2]) == 1
    assert isinstance(model.norm2, torch.nn.BatchNorm2d)  # conv2's output is read twice
    assert not isinstance(model.norm1, torch.nn.BatchNorm2d)  # folded into conv1
    with torch.inference_mode():
        assert torch.allclose(model(x), expected, atol=1e-5, rtol=1e-5)


def test_image_encoder_agrees_with_the_plain_module_and_says_so_in_its_identity():
    cfg = compose_config(
        ["encoder.vision.crop_size=64", "encoder.vision.resize_size=64"]
    ).encoder.vision
    encoder = ImageEncoder(cfg, "cpu")
    plain = IMAGE_MODELS[cfg.name](cfg).eval()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.model.modules())
    pixels = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        cosine = torch.nn.functional.cosine_similarity(encoder.encode_pixels(pixels), plain(pixels))
    assert float(cosine.min()) >= 0.99999
    assert encoder.identity["inference"] == INFERENCE_FORM == vision_identity(cfg)["inference"]


def _noise_images(sizes: list[tuple[int, int]]):
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    return [
        Image.fromarray(
            torch.randint(0, 256, (h, w, 3), generator=generator, dtype=torch.uint8).numpy()
        )
        for w, h in sizes
    ]


def test_crops_normalised_as_a_batch_are_torchvisions_transform_bit_for_bit():
    """What the loader hands on (bytes) and the model side finishes (a batch normalised at once)
    must be the embeddings' old input exactly: the cache identity does not change with it."""
    preprocessing = Preprocessing.from_config(compose_config([]).encoder.vision)
    # up- and downscaled, square and not, odd sizes: every resize and crop offset path
    images = _noise_images([(32, 32), (224, 224), (500, 333), (257, 641), (225, 300)])
    crops = [preprocessing.crop(image) for image in images]
    assert all(c.dtype == torch.uint8 and c.shape == (224, 224, 3) for c in crops)
    normalised = preprocessing.normalize(Preprocessing.stack(crops))
    reference = torch.stack([preprocessing.transform()(image) for image in images])
    assert normalised.dtype == torch.float32
    assert normalised.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(normalised, reference)


def test_image_encoder_normalises_byte_batches_itself():
    cfg = compose_config(
        ["encoder.vision.crop_size=64", "encoder.vision.resize_size=72"]
    ).encoder.vision
    encoder = ImageEncoder(cfg, "cpu")
    images = _noise_images([(80, 72), (72, 100), (64, 64)])
    crops = Preprocessing.stack([encoder.preprocessing.crop(image) for image in images])
    floats = torch.stack([encoder.preprocessing.transform()(image) for image in images])
    assert torch.equal(encoder.encode_pixels(crops), encoder.encode_pixels(floats))


def test_auto_num_workers():
    cores = len(os.sched_getaffinity(0))
    assert auto_num_workers(torch.device("cpu")) == cores // 8
    assert 1 <= auto_num_workers(torch.device("cuda")) <= 16


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "asif-prefetch"]


def test_prefetched_yields_in_order_raises_the_producers_error_and_stops_with_the_consumer():
    assert list(prefetched(range(10), depth=2)) == list(range(10))

    def failing():
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(prefetched(failing()))
    produced = []

    def endless():
        while True:
            produced.append(len(produced))
            yield produced[-1]

    for item in prefetched(endless(), depth=2):
        if item == 3:
            break
    assert not _prefetch_threads()  # the producer stopped with the consumer
    assert len(produced) <= 3 + 1 + 2 + 1  # the consumed ones, the queue's depth, one in hand


@pytest.mark.parametrize("streams", [1, 3])
def test_encode_batches_gives_each_batch_its_own_features_in_order(streams):
    cfg = compose_config(
        ["encoder.vision.crop_size=64", "encoder.vision.resize_size=64"]
    ).encoder.vision
    encoder = ImageEncoder(cfg, "cpu")
    encoder.streams = streams
    generator = torch.Generator().manual_seed(0)
    batches = [(f"b{i}", torch.randn(2 + i % 3, 3, 64, 64, generator=generator)) for i in range(7)]
    threads = torch.get_num_threads()
    encoded = list(encoder.encode_batches(batches))
    assert torch.get_num_threads() == threads  # the streams' thread count is undone
    assert [key for key, _ in encoded] == [key for key, _ in batches]
    with torch_threads(max(1, threads // streams)):
        for (_, features), (_, pixels) in zip(encoded, batches, strict=True):
            # the same bits as the batch alone on a stream's share of the threads
            assert torch.equal(features, encoder.encode_pixels(pixels))


def test_cpu_streams_come_from_the_config_and_are_one_on_a_gpu_or_by_default_two():
    cfg = compose_config(["encoder.vision.cpu_streams=3"]).encoder.vision
    assert ImageEncoder(cfg, "cpu").streams == 3
    default = ImageEncoder(compose_config([]).encoder.vision, "cpu")
    assert default.streams == (2 if torch.get_num_threads() >= 2 else 1)


@pytest.mark.skipif(glibc() is None, reason="glibc's malloc settings: this C library is not glibc")
def test_reused_allocations_keep_a_freed_block_for_the_next_batch():
    """A freed 256 MiB block (a batch's activations) is reused, not mapped and faulted in
    again; outside the block glibc maps it fresh, page by page."""

    def faults_of_a_fresh_block() -> int:
        torch.ones(1 << 26).sum()  # allocated, touched, freed
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(1 << 26).sum()
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    pages = (1 << 28) // resource.getpagesize()
    assert faults_of_a_fresh_block() > pages // 2
    with reused_allocations():
        assert faults_of_a_fresh_block() < pages // 20
    assert faults_of_a_fresh_block() > pages // 2
