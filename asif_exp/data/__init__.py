"""Anchor sets (image-caption pairs) and benchmarks (labelled images, class names, templates;
or images with their captions, for retrieval).

One module per source kind, each registering its loader kinds with `registry`:
pairs_files (jsonl, csv: anchors, or a retrieval benchmark), shards (webdataset, parquet,
hf_files: img2dataset output), hf_torchvision (hf, torchvision), image_folders (image_folder,
labels_csv, class_index_folder) and synthetic (the embedded default). `common` holds the types
and helpers they share.
"""

from asif_exp.data import hf_torchvision, image_folders, pairs_files, shards, synthetic  # noqa: F401
from asif_exp.data.common import (
    IMAGE_SUFFIXES,
    AnchorSet,
    Benchmark,
    CaptionedBenchmark,
    ImageFiles,
    MissingImage,
    Subset,
    apply_repeated_pairs_policy,
    authors_split_indices,
    balanced_subset,
    captioned_benchmark,
    is_blank,
    readable_in_prefixes,
    sha_of,
    to_rgb,
)
from asif_exp.data.hf_torchvision import HFImages
from asif_exp.data.registry import (
    ANCHOR_LOADERS,
    BENCHMARK_LOADERS,
    CAPTIONED_BENCHMARK_LOADERS,
    check_prompt_lists,
    load_anchors,
    load_benchmark,
)
from asif_exp.data.shards import ShardImages, scan_tar, shard_files
from asif_exp.data.synthetic import SyntheticImages

__all__ = [
    "ANCHOR_LOADERS",
    "BENCHMARK_LOADERS",
    "CAPTIONED_BENCHMARK_LOADERS",
    "IMAGE_SUFFIXES",
    "AnchorSet",
    "Benchmark",
    "CaptionedBenchmark",
    "HFImages",
    "ImageFiles",
    "MissingImage",
    "ShardImages",
    "Subset",
    "SyntheticImages",
    "apply_repeated_pairs_policy",
    "authors_split_indices",
    "balanced_subset",
    "captioned_benchmark",
    "is_blank",
    "check_prompt_lists",
    "load_anchors",
    "load_benchmark",
    "readable_in_prefixes",
    "scan_tar",
    "shard_files",
    "sha_of",
    "to_rgb",
]
