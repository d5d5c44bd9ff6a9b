"""Benchmark: the encoding step, on real images, against the path the project ran before.

For each configured image encoder (default EfficientNet-Lite0) on a few hundred CIFAR-10 test
images and Flickr8k test images from `../shared/data` (`ASIF_DATA_ROOT`), and for the text
encoder (default all-MiniLM-L6-v2) on Flickr8k test captions, it times in one run, interleaved
and repeated (the CPU machines are shared, so load varies):

- **preprocessing alone**: reading, decoding, resizing and cropping the images to bytes on one
  thread, as the prefetch thread does (`Preprocessing.crop`, freed memory reused); **today's
  preprocessing alone** the same with torchvision's whole transform (to normalised floats), as
  before;
- **model alone**: the encoder as `python -m asif_exp` builds and calls it
  (`ImageEncoder.encode_batches`: on CPU `cpu_streams` batches at once, freed memory reused),
  on crops made in advance, in batches of the config's batch size; it normalises each batch
  (on GPU after the host-to-device copy, which is included);
- **model alone, one stream**: the same on one stream (what the streams add);
- **model alone, glibc defaults**: `encode_pixels` batch after batch, outside
  `allocator.reused_allocations` (what keeping freed memory adds; glibc's thresholds then sit
  where `reused_allocations` leaves them, its own adjustment's ceiling);
- **pipeline**: `asif_exp.embeddings.encode_images` with that encoder, as `python -m asif_exp`
  runs it (the config's batch size and `num_workers`; null: `auto_num_workers`), from image
  files to features; **pipeline, one stream** the same on one stream; `--workers 0,1` adds the
  same path with those DataLoader worker counts;
- **today's path**: the path before issue 23, re-implemented here as it was (float32 NCHW
  timm module with its batch norms, `num_workers=0`, images read and preprocessed in the main
  process between forward passes, stacked there, then `model(pixels.to(device))`).

It prints images/s (median and min-max over the repeats), `encoding speed-up over today's path`
(today's time / the pipeline's, the median of the per-round ratios, and their range),
`pipeline / model alone`, whether the streams give the same bits as one stream, and the lowest
cosine between an image's embedding from the pipeline and from today's path. Encoder configs
whose weights come from the hub (`name: timm`: the paper's ViT-B/16, DINO ViT-S/8) are timed
with random weights (`encoders.build_architecture`: timing only, offline); their configured
precision applies on GPU.

    python experiments/bench/bench_encoding.py                       # CPU, Lite0 + MiniLM
    python experiments/bench/bench_encoding.py --vision efficientnet_lite0,vit_b16_in21k_miil
    python experiments/bench/bench_encoding.py --device cuda --cifar 2048 --flickr 1024
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from asif_exp.allocator import reused_allocations  # noqa: E402
from asif_exp.embeddings import auto_num_workers, encode_images  # noqa: E402
from asif_exp.encoders import (  # noqa: E402
    IMAGE_MODELS,
    ImageEncoder,
    Preprocessing,
    TextEncoder,
    build_architecture,
    register_image_model,
    torch_threads,
)

RANDOM_WEIGHTS = "bench_random_weights"
register_image_model(RANDOM_WEIGHTS)(lambda cfg, with_classifier=False: build_architecture(cfg))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--vision", default="efficientnet_lite0", help="encoder/vision configs")
    parser.add_argument("--text", default="minilm_l6", help="encoder/text config ('' to skip)")
    parser.add_argument("--cifar", type=int, default=256, help="CIFAR-10 test images")
    parser.add_argument("--flickr", type=int, default=256, help="Flickr8k test images")
    parser.add_argument("--captions", type=int, default=640, help="Flickr8k test captions")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of interleaved variants")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--batch-size", type=int, help="image batch size (default: the config's)")
    parser.add_argument(
        "--workers", default="", help="extra pipeline variants with these DataLoader workers"
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="write every number here")
    args = parser.parse_args(argv)
    args.vision = [name for name in args.vision.split(",") if name]
    args.workers = [int(w) for w in args.workers.split(",") if w]
    return args


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import asif_exp.config  # noqa: F401  (registers the schemas)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def load_age() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} on {os.cpu_count()} CPUs"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- today's path


class _TodaysPixels(Dataset):
    """embeddings._Pixels as it was: (index, preprocessed image, error)."""

    def __init__(self, source, transform):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        return index, self.transform(self.source.load(index)), None


class TodaysPath:
    """The encoding path before this change, as it was: the timm module as built (batch norms
    separate, NCHW float32), DataLoader with `num_workers=0` and a collate that returns the list,
    `torch.stack` in the main process, `model(pixels.to(device))` under inference mode."""

    def __init__(self, vision_cfg, device: torch.device):
        self.device = device
        self.transform = Preprocessing.from_config(vision_cfg).transform()
        self.model = IMAGE_MODELS[vision_cfg.name](vision_cfg).eval().to(device)
        self.precision = str(vision_cfg.get("precision", "float32"))

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device)
        autocast = self.device.type == "cuda" and self.precision != "float32"
        with torch.autocast("cuda", dtype=getattr(torch, self.precision), enabled=autocast):
            features = self.model(pixels)
        return features.float().cpu()

    def encode(self, source, batch_size: int) -> torch.Tensor:
        loader = DataLoader(
            _TodaysPixels(source, self.transform),
            batch_size=batch_size,
            num_workers=0,
            collate_fn=lambda batch: batch,
        )
        features = []
        for batch in loader:
            features.append(self.encode_pixels(torch.stack([p for _, p, _ in batch])))
        return torch.cat(features)


# ----------------------------------------------------------------------------- measurements


@contextmanager
def streams_set(encoder: ImageEncoder, streams: int | None) -> Iterator[None]:
    """The encoder on `streams` streams inside the block (None: as configured)."""
    configured = encoder.streams
    encoder.streams = streams or configured
    try:
        yield
    finally:
        encoder.streams = configured


def encode_batches(encoder: ImageEncoder, batches: list, streams: int | None = None):
    """The encoder on batches preprocessed in advance, as the pipeline calls it (`streams`
    batches at a time, freed memory reused), on `streams` streams if given."""
    with streams_set(encoder, streams):
        return torch.cat([features for _, features in encoder.encode_batches(enumerate(batches))])


def timed(fn, device: torch.device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def summary(seconds: list[float], items: int) -> dict:
    rates = sorted(items / s for s in seconds)
    return {
        "items": items,
        "seconds": seconds,
        "per_s_median": statistics.median(rates),
        "per_s_min": rates[0],
        "per_s_max": rates[-1],
    }


def ratio_summary(numerators: list[float], denominators: list[float]) -> dict:
    ratios = sorted(n / d for n, d in zip(numerators, denominators, strict=True))
    return {"median": statistics.median(ratios), "min": ratios[0], "max": ratios[-1]}


def preprocess_on_one_thread(preprocess, source) -> list:
    """`preprocess` of every image read from `source`, on one thread as the prefetch thread
    runs it (its torch operations on one thread)."""
    with torch_threads(1), reused_allocations():
        return [preprocess(source.load(i)) for i in range(len(source))]


def encode_on_one_stream(encoder: ImageEncoder, source, batch_size: int, workers: int):
    with streams_set(encoder, 1):
        return encode_images(encoder, source, batch_size, workers, "raise", "bench", False)[0]


def bench_images(vision_name: str, sets: dict, args, device: torch.device) -> dict:
    """Every variant on every image set, interleaved, `args.repeats` rounds."""
    cfg = compose([f"encoder/vision={vision_name}"]).encoder.vision
    random_weights = cfg.name == "timm"  # hub weights: not reachable here, time the network
    if random_weights:
        cfg.name = RANDOM_WEIGHTS
    batch_size = args.batch_size or int(cfg.batch_size)
    torch.manual_seed(0)  # random weights: the same ones in both, so that they can be compared
    encoder = ImageEncoder(cfg, str(device))
    torch.manual_seed(0)
    today = TodaysPath(cfg, device)
    workers = cfg.num_workers if cfg.num_workers is not None else auto_num_workers(device)
    report = {
        "config": vision_name,
        "model_name": cfg.model_name,
        "random_weights": random_weights,
        "batch_size": batch_size,
        "num_workers": workers,
        "streams": encoder.streams,
        "sets": {},
    }
    for set_name, source in sets.items():
        # model alone: the images cropped in advance, in the pipeline's batches; today's
        # model: the same images as it took them
        crops = [encoder.preprocessing.crop(source.load(i)) for i in range(len(source))]
        batches = [
            Preprocessing.stack(crops[i : i + batch_size]) for i in range(0, len(crops), batch_size)
        ]
        todays_pixels = [today.transform(source.load(i)) for i in range(len(source))]
        todays_batches = [
            torch.stack(todays_pixels[i : i + batch_size])
            for i in range(0, len(todays_pixels), batch_size)
        ]
        if device.type == "cuda":
            batches = [b.pin_memory() for b in batches]
            todays_batches = [b.pin_memory() for b in todays_batches]
        variants = {
            "preprocessing alone": lambda source=source: preprocess_on_one_thread(
                encoder.preprocessing.crop, source
            ),
            "today's preprocessing alone": lambda source=source: preprocess_on_one_thread(
                today.transform, source
            ),
            "model alone": lambda batches=batches: encode_batches(encoder, batches),
            "model alone, one stream": lambda batches=batches: encode_batches(
                encoder, batches, streams=1
            ),
            "model alone, glibc defaults": lambda batches=batches: torch.cat(
                [encoder.encode_pixels(b) for b in batches]
            ),
            "today's model alone": lambda batches=todays_batches: torch.cat(
                [today.encode_pixels(b) for b in batches]
            ),
            "pipeline": lambda source=source: encode_images(
                encoder, source, batch_size, workers, "raise", "bench", progress=False
            )[0],
            "today's path": lambda source=source: today.encode(source, batch_size),
        }
        if encoder.streams > 1:
            variants["pipeline, one stream"] = lambda source=source: encode_on_one_stream(
                encoder, source, batch_size, workers
            )
        for extra in args.workers:
            if extra != workers:
                variants[f"pipeline, {extra} workers"] = lambda source=source, extra=extra: (
                    encode_images(
                        encoder, source, batch_size, extra, "raise", "bench", progress=False
                    )[0]
                )
        # warm-up on one batch (allocator, oneDNN primitives, cuDNN autotuning)
        encoder.encode_pixels(batches[0])
        today.encode_pixels(todays_batches[0])
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        outputs: dict[str, torch.Tensor] = {}
        for round_ in range(args.repeats):
            for name, fn in variants.items():
                spent, outputs[name] = timed(fn, device)
                seconds[name].append(spent)
            print(f"  [{vision_name} {set_name}] round {round_ + 1}: {load_age()}", flush=True)
        cosine = torch.nn.functional.cosine_similarity(outputs["pipeline"], outputs["today's path"])
        report["sets"][set_name] = {
            "images": len(source),
            "variants": {name: summary(s, len(source)) for name, s in seconds.items()},
            "speedup_over_today": ratio_summary(seconds["today's path"], seconds["pipeline"]),
            "pipeline_over_model": ratio_summary(seconds["model alone"], seconds["pipeline"]),
            "model_speedup": ratio_summary(seconds["today's model alone"], seconds["model alone"]),
            "preprocessing_speedup": ratio_summary(
                seconds["today's preprocessing alone"], seconds["preprocessing alone"]
            ),
            "streams_speedup": ratio_summary(
                seconds["model alone, one stream"], seconds["model alone"]
            ),
            "allocator_speedup": ratio_summary(
                seconds["model alone, glibc defaults"], seconds["model alone, one stream"]
            ),
            "min_cosine_to_today": float(cosine.min()),
            "streams_same_bits": torch.equal(
                outputs["model alone"], outputs["model alone, one stream"]
            ),
            "max_abs_difference_to_today": float(
                (outputs["pipeline"] - outputs["today's path"]).abs().max()
            ),
        }
        print_set(set_name, report["sets"][set_name])  # as it comes: a long run may be cut
    return report


def bench_text(text_name: str, captions: list[str], args, device: torch.device) -> dict:
    """MiniLM on captions: the model's forward on tokenized batches, and `TextEncoder.encode`
    (sentence-transformers: tokenize, sort by length, forward, pool, normalise) as the project
    calls it; the text path is unchanged, so that is also today's."""
    cfg = compose([f"encoder/text={text_name}"]).encoder.text
    encoder = TextEncoder(cfg, str(device))
    model, batch_size = encoder.model, encoder.batch_size
    by_length = sorted(captions, key=len)  # as sentence-transformers batches them
    tokenize = getattr(model, "preprocess", None) or model.tokenize
    features = [
        {
            key: value.to(device) if isinstance(value, torch.Tensor) else value
            for key, value in tokenize(by_length[i : i + batch_size]).items()
        }
        for i in range(0, len(by_length), batch_size)
    ]

    @torch.inference_mode()
    def model_alone():
        return [model(f)["sentence_embedding"] for f in features]

    variants = {"model alone": model_alone, "pipeline": lambda: encoder.encode(captions)}
    model_alone()
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            seconds[name].append(timed(fn, device)[0])
    return {
        "config": text_name,
        "model_name": cfg.model_name,
        "batch_size": batch_size,
        "captions": len(captions),
        "variants": {name: summary(s, len(captions)) for name, s in seconds.items()},
        "pipeline_over_model": ratio_summary(seconds["model alone"], seconds["pipeline"]),
    }


# ----------------------------------------------------------------------------- report


def rate(v: dict) -> str:
    return f"{v['per_s_median']:8.1f}  ({v['per_s_min']:.1f}-{v['per_s_max']:.1f})"


def print_images(report: dict) -> None:
    tag = " (random weights: timing only)" if report["random_weights"] else ""
    print(
        f"\n{report['config']} ({report['model_name']}{tag}), batch {report['batch_size']}, "
        f"{report['streams']} streams, pipeline with {report['num_workers']} DataLoader workers"
    )
    for set_name, result in report["sets"].items():
        print_set(set_name, result)


def print_set(set_name: str, result: dict) -> None:
    print(f"  {set_name}, {result['images']} images: images/s, median (min-max)")
    for name, v in result["variants"].items():
        print(f"    {name:<28} {rate(v)}  {1000 / v['per_s_median']:7.1f} s per 1,000 images")
    s, p, m = (
        result["speedup_over_today"],
        result["pipeline_over_model"],
        result["model_speedup"],
    )
    print(
        f"    encoding speed-up over today's path: {s['median']:.2f}x "
        f"(rounds {s['min']:.2f}-{s['max']:.2f})"
    )
    print(f"    pipeline / model alone: {p['median']:.2f}x (rounds {p['min']:.2f}-{p['max']:.2f})")
    print(f"    model alone / today's model alone: {m['median']:.2f}x")
    print(
        f"    preprocessing alone / today's (torchvision's transform): "
        f"{result['preprocessing_speedup']['median']:.2f}x"
    )
    print(f"    model alone / the same on one stream: {result['streams_speedup']['median']:.2f}x")
    print(
        f"    one stream / the same with glibc's defaults: "
        f"{result['allocator_speedup']['median']:.2f}x"
    )
    same = "the same bits" if result["streams_same_bits"] else "not the same bits"
    print(f"    model alone on its streams and on one stream: {same}")
    print(
        f"    embeddings against today's path: lowest cosine "
        f"{result['min_cosine_to_today']:.7f}, largest |difference| "
        f"{result['max_abs_difference_to_today']:.2e}"
    )


def print_text(report: dict) -> None:
    print(f"\n{report['config']} ({report['model_name']}), batch {report['batch_size']}")
    print(f"  Flickr8k test, {report['captions']} captions: captions/s, median (min-max)")
    for name, v in report["variants"].items():
        print(f"    {name:<24} {rate(v)}  {1000 / v['per_s_median']:7.2f} s per 1,000 captions")
    p = report["pipeline_over_model"]
    print(f"    pipeline / model alone: {p['median']:.2f}x (rounds {p['min']:.2f}-{p['max']:.2f})")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from asif_exp.data import Subset, load_benchmark

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    data_root = os.environ.get("ASIF_DATA_ROOT", str(ROOT.parent / "shared" / "data"))
    if not Path(data_root).is_dir():
        raise SystemExit(f"error: no data folder at {data_root} (set ASIF_DATA_ROOT)")
    cifar = load_benchmark(
        compose(["benchmark=cifar10", f"benchmark.subset={args.cifar}"]).benchmark, data_root
    )
    pairs = 5 * max(args.flickr, -(-args.captions // 5))  # Flickr8k: 5 captions per image
    flickr = load_benchmark(
        compose(["benchmark=flickr8k", f"benchmark.limit={pairs}"]).benchmark, data_root
    )
    sets = {
        "CIFAR-10 test": cifar.images,
        "Flickr8k test": Subset(flickr.images, list(range(args.flickr))),
    }
    started = load_age()
    print(
        f"bench_encoding: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"device {device}, {torch.get_num_threads()} torch threads, {args.repeats} rounds; "
        f"at start: {started}",
        flush=True,
    )
    report = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_at_start": started,
        "vision": [bench_images(name, sets, args, device) for name in args.vision],
    }
    if args.text:
        captions = flickr.captions[: args.captions]
        report["text"] = bench_text(args.text, captions, args, device)
    report["load_at_end"] = load_age()
    print(f"\nat start: {started}\nat end:   {report['load_at_end']}")
    for vision in report["vision"]:
        print_images(vision)
    if args.text:
        print_text(report["text"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
