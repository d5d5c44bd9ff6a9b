"""Typed schemas for every config group, registered in Hydra's ConfigStore.

Each YAML file in `conf/<group>/` names its schema in its defaults list, so a misspelt key or a
value of the wrong type fails at composition, before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[1]

if not OmegaConf.has_resolver("project_root"):
    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))

# The choices of enumerated options that the modules reading them check too (see also
# `asif_exp.options.CHOICES`, every enumerated option's choices).
NORMALIZE_CHOICES = ("both", "prompt", "none")  # asif.normalize
AGGREGATION_CHOICES = ("mean", "max")  # asif.template_aggregation, method.template_aggregation
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")  # asif.compute_dtype, encoder precision
# data.on_bad_image: what an image that cannot be loaded does. "skip_failed_downloads" skips
# only the pairs a shard lists without an image (a failed download) and stops at corrupt
# bytes; "skip" skips both; "raise" stops at the first.
ON_BAD_IMAGE = ("skip", "skip_failed_downloads", "raise")
REPEATED_PAIRS_POLICIES = ("keep", "drop", "error")  # anchors.repeated_pairs


@dataclass
class VisionEncoderConfig:
    name: str = MISSING  # registry entry: efficientnet_lite0, efficientnet_lite2, timm
    model_name: str = MISSING  # timm architecture or hub id
    weights: str = MISSING  # where the weights come from (part of the cache key)
    resize_size: int = 256
    crop_size: int = 224
    interpolation: str = "bicubic"
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    batch_size: int = 32
    num_workers: int | None = None  # DataLoader workers; null: embeddings.auto_num_workers
    cpu_streams: int | None = None  # batches encoded at once on CPU; null: auto_cpu_streams
    precision: str = "float32"  # autocast dtype on GPU: float32, float16, bfloat16


@dataclass
class TextEncoderConfig:
    name: str = MISSING  # registry entry: minilm_l6, sentence_transformers
    model_name: str = MISSING  # sentence-transformers id or path
    batch_size: int = 128
    max_seq_length: int | None = None


@dataclass
class AnchorsConfig:
    name: str = MISSING
    loader: str = MISSING  # synthetic, jsonl, csv, hf
    path: str | None = None  # jsonl/csv file, or HF dataset name / local dir
    image_root: str | None = None  # folder that image paths in the file are relative to
    image_column: str = "image"
    caption_column: str = "caption"
    split: str = "train"
    hf_config: str | None = None
    limit: int | None = None  # keep the first `limit` pairs (order is the file's)
    # jsonl/csv: keep only records whose `split_column` is one of these (null: every record)
    splits: list[str] | None = None
    split_column: str = "split"
    repeated_pairs: str = "keep"  # the same image-caption pair twice: keep, drop or error
    # webdataset / parquet shards (img2dataset layout) and hf_files
    data_files: Any = None  # hf_files: file(s) or glob(s) for datasets.load_dataset(path, ...)
    key_column: str = "key"  # parquet: the sample key (names the image inside the shard's .tar)
    status_column: str | None = "status"  # parquet: img2dataset download status ("success")
    # synthetic
    seed: int = 0
    start: int = 0
    num_samples: int = 1000
    image_size: int = 224


@dataclass
class BenchmarkConfig:
    name: str = MISSING
    # labelled images: synthetic, image_folder, labels_csv, hf, torchvision, class_index_folder;
    # image-caption pairs (retrieval): jsonl, csv
    loader: str = MISSING
    root: str | None = None
    split: str = "test"
    class_names: str | None = None  # built-in list (data/prompts/classnames); None: from data
    templates: str = "photo1"  # built-in template set (asif_exp/data/prompts/templates)
    subset: int | None = None  # class-balanced seeded subset of this many images
    subset_seed: int = 0
    labels_file: str | None = None  # labels_csv: CSV with file,label columns
    image_column: str = "image"
    label_column: str = "label"
    hf_config: str | None = None
    torchvision_class: str | None = None  # torchvision: dataset class, e.g. CIFAR100
    # class_index_folder: how a class folder's name gives its label: "ids" (the name is the
    # class's id in the built-in prompts/class_ids/<class_names>.txt: ImageNet's wnids, any
    # subset of classes), "int" (the name is the index: ImageNet-v2's 0..999) or "sorted" (the
    # i-th folder in sorted order is class i: needs every class's folder)
    folder_labels: str = "ids"
    # The ASIF authors' split: a seeded permutation whose first half is "val" (to tune k and p)
    # and second half "test". null: every image.
    authors_split: str | None = None
    authors_split_seed: int = 42
    # synthetic
    seed: int = 0
    start: int = 1_000_000  # disjoint from the anchors' indices
    num_samples: int = 400
    image_size: int = 224
    label_attribute: str = "shape"
    # image-caption pairs (loader jsonl or csv): a retrieval benchmark, as anchors are read
    path: str | None = None  # the pairs file
    image_root: str | None = None  # folder the image paths are relative to (null: the file's)
    caption_column: str = "caption"
    splits: list[str] | None = None  # keep records whose `split_column` is one of these
    split_column: str = "split"
    limit: int | None = None  # keep the first `limit` pairs (after `splits`), in file order


@dataclass
class AsifConfig:
    # A single value, or a list to evaluate the whole grid in one engine pass.
    n: Any = None  # anchors used (a prefix); None: all
    k: Any = 200
    p: Any = 2.0
    clamp_negative: bool = True
    normalize: str = "both"  # both, prompt, none
    template_aggregation: str = "mean"  # mean, max
    compute_dtype: str = "auto"
    memory_budget_mb: float = 1024.0
    preset: str = "clean"  # a label recorded in results: clean, authors, authors_unclamped, custom


# ----------------------------------------------------------------------------- methods and tasks
# One schema per conf/method/<name>.yaml and conf/task/<name>.yaml (each names it in its
# defaults list): a misspelt or mistyped option fails at composition. Options that take a value
# or a list (swept in one job) are `Any` here; `options.check_config` checks their values.


@dataclass
class AsifMethodConfig:
    name: str = "asif"  # its options are the `asif` group


@dataclass
class RidgeConfig:
    name: str = "ridge"
    alpha: Any = MISSING  # a positive number or a list of them
    template_aggregation: str = "mean"


@dataclass
class CanonicalConfig:
    """cca and csa."""

    name: str = MISSING
    r: Any = MISSING  # a positive integer or a list of them
    regularization: Any = MISSING  # a number in [0, 1] or a list of them
    template_aggregation: str = "mean"


@dataclass
class NoOptionsMethodConfig:
    """procrustes and dense_rr: no hyper-parameters."""

    name: str = MISSING
    template_aggregation: str = "mean"


@dataclass
class ClassificationConfig:
    name: str = "classification"


@dataclass
class RetrievalConfig:
    name: str = "retrieval"
    recall_at: Any = field(default_factory=lambda: [1, 5, 10])  # positive integers


METHOD_SCHEMAS = {
    "asif": AsifMethodConfig,
    "ridge": RidgeConfig,
    "cca": CanonicalConfig,
    "csa": CanonicalConfig,
    "procrustes": NoOptionsMethodConfig,
    "dense_rr": NoOptionsMethodConfig,
}
TASK_SCHEMAS = {"classification": ClassificationConfig, "retrieval": RetrievalConfig}


@dataclass
class LoggerConfig:
    name: str = "none"  # none, wandb
    project: str = "asif_exp"
    entity: str | None = None
    mode: str = "offline"  # online, offline, disabled
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class PathsConfig:
    root: str = MISSING
    data_root: str = MISSING
    cache_dir: str = MISSING
    output_dir: str = MISSING


@dataclass
class DataConfig:
    on_bad_image: str = "skip"  # skip (and report), skip_failed_downloads, raise


@dataclass
class EncoderConfig:
    vision: VisionEncoderConfig = MISSING
    text: TextEncoderConfig = MISSING


@dataclass
class RunConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    anchors: AnchorsConfig = MISSING
    benchmark: BenchmarkConfig = MISSING
    asif: AsifConfig = field(default_factory=AsifConfig)
    # conf/method/<name>.yaml and conf/task/<name>.yaml: `name` plus that module's own options
    method: Any = MISSING
    task: Any = MISSING
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    device: str = "auto"
    seed: int = 0
    cache: bool = True
    # how embeddings are stored in the cache: float32, or float16 / bfloat16 (half the disk
    # and memory; part of the cache identity)
    cache_dtype: str = "float32"
    progress: bool = True
    sweep_name: str | None = None
    skip_existing: bool = False


@dataclass
class EditConfig:
    """Anchor pairs removed before anything is computed (any criterion selects a pair)."""

    remove_indices: list[int] = field(default_factory=list)  # positions among the n anchors
    remove_ids: list[str] = field(default_factory=list)  # image ids (all captions of an image)
    remove_caption_contains: str | None = None  # substring, case-sensitive
    remove_caption_regex: str | None = None  # Python regex, re.search


@dataclass
class AbstainConfig:
    threshold: float | None = None  # operating point reported in explain_results.json
    num_thresholds: int = 50  # points on each coverage curve


@dataclass
class ExplainRunConfig(RunConfig):
    """`python -m asif_exp.explain`: the run's config plus what to look at. conf/explain.yaml
    composes `config` with this schema in the place of RunConfig (`override schema: explain`),
    so config.yaml's values stand and only the fields below are added."""

    query: Any = 0  # an index (a benchmark image, or a caption for text_to_image), a list, misses
    direction: str | None = None  # null: the task's first (classification: the only one)
    num_misses: int = 4  # query=misses: the first this many queries whose top-1 is wrong
    top_candidates: int = 5  # retrieval: best candidates listed per query
    top_anchors: int = 6  # anchor pairs drawn per explained candidate in the figure
    edit: EditConfig = field(default_factory=EditConfig)
    abstain: AbstainConfig = field(default_factory=AbstainConfig)
    usage: bool = True  # anchor usage over the benchmark, and pruning never-used anchors
    model_dir: str | None = None  # a saved model to use instead of building one from anchors
    save_model: bool = False  # write the (edited) model to <output_dir>/model


@dataclass
class ExtractConfig:
    """`python -m asif_exp.extract`: anchor embeddings in resumable chunks, fanned out as jobs."""

    shard: int = 0  # this job encodes chunks shard, shard + num_shards, ...
    num_shards: int = 1
    chunk_size: int = 10_000  # pairs per chunk: cached as it completes, redone if killed
    stage: str = "all"  # encode (own chunks), merge (all chunks into the run cache), all (both)
    num_workers: int | None = None  # DataLoader workers; null: encoder.vision.num_workers


@dataclass
class ExtractRunConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    anchors: AnchorsConfig = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    device: str = "auto"  # auto: cuda (cuda:<shard % devices> with several GPUs), else cpu
    cache_dtype: str = "float32"  # as in the run config: the entries a run looks up
    progress: bool = True


def register_configs() -> None:
    store = ConfigStore.instance()
    # The root schemas, a group so that explain.yaml can swap its own in for the run's.
    store.store(group="schema", name="run", node=RunConfig, package="_global_")
    store.store(group="schema", name="explain", node=ExplainRunConfig, package="_global_")
    store.store(name="extract_schema", node=ExtractRunConfig)
    store.store(group="encoder/vision", name="vision_schema", node=VisionEncoderConfig)
    store.store(group="encoder/text", name="text_schema", node=TextEncoderConfig)
    store.store(group="anchors", name="anchors_schema", node=AnchorsConfig)
    store.store(group="benchmark", name="benchmark_schema", node=BenchmarkConfig)
    store.store(group="asif", name="asif_schema", node=AsifConfig)
    store.store(group="logger", name="logger_schema", node=LoggerConfig)
    store.store(group="paths", name="paths_schema", node=PathsConfig)
    for group, schemas in (("method", METHOD_SCHEMAS), ("task", TASK_SCHEMAS)):
        for name, node in schemas.items():
            store.store(group=group, name=f"{name}_schema", node=node)


register_configs()
