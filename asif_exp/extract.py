"""Anchor embeddings at scale (CC12M's 1.6M pairs): resumable chunks, fanned out as Hydra jobs.

The anchor set is cut into chunks of `extract.chunk_size` consecutive pairs. Job `shard` of
`num_shards` encodes chunks shard, shard + num_shards, ... (images and captions); each chunk is
cached as soon as it completes, so a killed job redoes at most the chunk it was in. The merge
stage makes exactly the cache entries that `python -m asif_exp` looks up out of the chunks'
own files (hard links: no copy on disk, nothing concatenated in memory), so evaluation jobs
never encode an anchor, and read the anchors chunk by chunk from disk. `cache_dtype`
(float32, float16, bfloat16) is the dtype the chunks are stored in.

    # one process, everything (tiny sets, or one GPU):
    python -m asif_exp.extract anchors=cc12m encoder/vision=vit_b16_in21k \
        encoder/text=sentence_t5_base
    # 64 SLURM jobs (hydra-submitit-launcher), then one merge:
    python -m asif_exp.extract -m hydra/launcher=slurm_gpu anchors=cc12m ... \
        extract.stage=encode extract.num_shards=64 'extract.shard=range(0,64)'
    python -m asif_exp.extract anchors=cc12m ... extract.stage=merge

Failed downloads (listed pairs without an image) and undecodable images are counted and listed
in `<output_dir>/extract.json`, and carried into results.json as the anchors' skipped images.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from asif_exp import config as _config  # noqa: F401  (registers the schemas)
from asif_exp.cli import run_cli, user_errors_in_one_line
from asif_exp.data import AnchorSet, Subset, file_hashes, load_anchors, sha_of
from asif_exp.embeddings import Chunk, EmbeddingCache, encode_images, storage_dtype
from asif_exp.encoders import ImageEncoder, TextEncoder, text_identity
from asif_exp.errors import ConfigError
from asif_exp.pipeline import check_run_config, image_cache_identity, text_cache_identity
from asif_exp.results import write_json_atomic

log = logging.getLogger(__name__)


def chunk_ranges(size: int, chunk_size: int) -> list[tuple[int, int]]:
    if chunk_size < 1:
        raise ConfigError(f"extract.chunk_size={chunk_size}: must be at least 1")
    return [(start, min(start + chunk_size, size)) for start in range(0, size, chunk_size)]


def shard_chunks(chunks: list, shard: int, num_shards: int) -> list[int]:
    """Indices of the chunks job `shard` encodes (round-robin, so jobs finish together)."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ConfigError(
            f"extract.shard={shard} of num_shards={num_shards}: need 0 <= shard < num_shards"
        )
    return list(range(shard, len(chunks), num_shards))


# The merged entries are the ones an evaluation looks up: the same identity functions.
def cache_dtype(cfg) -> str:
    return cfg.get("cache_dtype", "float32")


def anchor_image_identity(cfg, anchors: AnchorSet) -> dict:
    file_hashes.remember_in(cfg.paths.cache_dir)
    return image_cache_identity(cfg.encoder.vision, anchors.images, cache_dtype(cfg))


def anchor_text_identity(cfg, anchors: AnchorSet) -> dict:
    return text_cache_identity(cfg.encoder.text, anchors.captions, cache_dtype(cfg))


def chunk_identity(cfg, anchors: AnchorSet, start: int, stop: int) -> dict:
    # (its "image" part carries the storage dtype already)
    return {
        "kind": "anchor_chunk",
        "image": anchor_image_identity(cfg, anchors),
        "text_encoder": text_identity(cfg.encoder.text),
        "captions_sha": sha_of(anchors.captions[start:stop]),
        "start": start,
        "stop": stop,
    }


def job_device(device: str, shard: int) -> str:
    """`auto` picks this job's GPU when a node runs several jobs (joblib over local GPUs)."""
    if device != "auto" or not torch.cuda.is_available():
        return device if device != "auto" else "cpu"
    return f"cuda:{shard % torch.cuda.device_count()}"


class ChunkEncoder:
    """Encodes chunks; the encoders are loaded on the first chunk that is not cached."""

    def __init__(self, cfg: DictConfig, anchors: AnchorSet, device: str):
        self.cfg, self.anchors, self.device = cfg, anchors, device
        self._image_encoder: ImageEncoder | None = None
        self._text_encoder: TextEncoder | None = None

    def __call__(self, start: int, stop: int, label: str) -> tuple[dict, dict]:
        if self._image_encoder is None:
            self._image_encoder = ImageEncoder(self.cfg.encoder.vision, self.device)
            self._text_encoder = TextEncoder(self.cfg.encoder.text, self.device)
        vision, extract = self.cfg.encoder.vision, self.cfg.extract
        workers = extract.num_workers if extract.num_workers is not None else vision.num_workers
        part = Subset(self.anchors.images, list(range(start, stop)))
        try:
            image_embeddings, kept, failures = encode_images(
                self._image_encoder,
                part,
                vision.batch_size,
                workers,
                self.cfg.data.on_bad_image,
                label,
                self.cfg.progress,
            )
        except ValueError as error:
            if "no readable image" not in str(error):
                raise
            # A chunk whose every image failed still completes: all its pairs are reported.
            image_embeddings, kept = torch.empty(0, 0), []
            failures = [
                {"id": part.ids[i], "error": self._failure(part, i)} for i in range(len(part))
            ]
        text_embeddings = self._text_encoder.encode(self.anchors.captions[start:stop], False)
        tensors = {
            "image_embeddings": image_embeddings,
            "kept": torch.tensor([start + i for i in kept], dtype=torch.int64),
            "text_embeddings": text_embeddings,
        }
        return tensors, {"failures": failures}

    @staticmethod
    def _failure(part, index: int) -> str:
        try:
            part.load(index)
            return "unreadable"
        except Exception as error:
            return f"{type(error).__name__}: {error}"


def merge_chunks(
    cache: EmbeddingCache, cfg: DictConfig, anchors: AnchorSet, chunks: list[tuple[int, int]]
) -> dict:
    """Make the entries an evaluation job looks up out of every chunk's file (verified once)."""
    parts, missing = [], []
    for start, stop in chunks:
        entry = cache.entry(chunk_identity(cfg, anchors, start, stop))
        if entry is None:
            missing.append([start, stop])
        else:
            parts.append(entry)
    if missing:
        chunk_size = int(cfg.extract.chunk_size)
        other_sizes = sorted(_encoded_chunk_sizes(cache, cfg, anchors) - {chunk_size})
        if len(missing) == len(chunks) and other_sizes:
            raise RuntimeError(
                f"merge: extract.chunk_size={chunk_size}, but the encode jobs used "
                f"extract.chunk_size={other_sizes[0]}; merge with that value"
            )
        raise RuntimeError(
            f"merge: {len(missing)} of {len(chunks)} chunks are not encoded yet "
            f"(pairs {missing[:3]}...); run the encode jobs (they resume) and merge again"
        )
    failures = [f for p in parts for f in p.extra["failures"]]
    image_chunks = [
        renamed(c, {"embeddings": "image_embeddings", "kept": "kept"})
        for p in parts
        for c in p.chunks
        if c.rows["kept"]
    ]
    if not image_chunks:
        raise RuntimeError(f"merge: no readable image among the {len(anchors.captions)} anchors")
    cache.save_linked(anchor_image_identity(cfg, anchors), image_chunks, {"failures": failures})
    text_chunks = [renamed(c, {"embeddings": "text_embeddings"}) for p in parts for c in p.chunks]
    cache.save_linked(anchor_text_identity(cfg, anchors), text_chunks, {})
    return {"pairs_kept": sum(c.rows["kept"] for c in image_chunks), "failures": failures}


def renamed(chunk: Chunk, names: dict[str, str]) -> Chunk:
    """A chunk entry's file as a chunk of another entry, whose tensor `name` is the chunk
    entry's tensor `names[name]`."""
    return Chunk(
        chunk.file,
        chunk.bytes,
        chunk.sha256,
        {name: chunk.rows[old] for name, old in names.items()},
        {name: chunk.names[old] for name, old in names.items()},
    )


def run_extract(cfg: DictConfig) -> dict:
    """Encode this job's chunks and/or merge them; returns (and writes) a report."""
    check_run_config(cfg)  # extract.stage among them
    extract = cfg.extract
    started = time.perf_counter()
    anchors = load_anchors(cfg.anchors, cfg.paths.data_root)
    chunks = chunk_ranges(len(anchors.captions), int(extract.chunk_size))
    mine = shard_chunks(chunks, int(extract.shard), int(extract.num_shards))
    cache = EmbeddingCache(cfg.paths.cache_dir)
    report: dict = {
        "anchors": {"name": anchors.name, "pairs": len(anchors.captions)},
        "missing_images": len(getattr(anchors.images, "missing", [])),
        "chunks_total": len(chunks),
        "shard": int(extract.shard),
        "num_shards": int(extract.num_shards),
        "chunks_encoded": [],
        "chunks_cached": [],
        "failures": [],
    }
    dtype = storage_dtype(cache_dtype(cfg))
    if extract.stage in ("all", "encode"):
        encode = ChunkEncoder(cfg, anchors, job_device(cfg.device, int(extract.shard)))
        for number, index in enumerate(mine, 1):
            start, stop = chunks[index]
            label = f"chunk {index + 1}/{len(chunks)} ({number}/{len(mine)} of this job)"
            identity = chunk_identity(cfg, anchors, start, stop)
            tensors, extra, was_cached = cache.get_or_compute(
                identity, lambda s=start, e=stop, lb=label: encode(s, e, lb), dtype
            )
            (report["chunks_cached"] if was_cached else report["chunks_encoded"]).append(index)
            report["failures"].extend(extra["failures"])
            log.info(
                "%s: %s (%d failed images)",
                label,
                "cached" if was_cached else "encoded",
                len(extra["failures"]),
            )
    if extract.stage == "merge" or (
        extract.stage == "all" and _all_cached(cache, cfg, anchors, chunks)
    ):
        merged = merge_chunks(cache, cfg, anchors, chunks)
        report.update(merged=True, pairs_kept=merged["pairs_kept"], failures=merged["failures"])
    else:
        report["merged"] = False
    report["failed_images"] = len(report["failures"])
    report["seconds"] = time.perf_counter() - started
    write_json_atomic(Path(cfg.paths.output_dir) / "extract.json", report)
    log.info(
        "extract: %d chunks encoded, %d cached; %d failed images (%d not downloaded); merged=%s",
        len(report["chunks_encoded"]),
        len(report["chunks_cached"]),
        report["failed_images"],
        report["missing_images"],
        report["merged"],
    )
    return report


def _encoded_chunk_sizes(cache: EmbeddingCache, cfg, anchors: AnchorSet) -> set[int]:
    """Chunk sizes of this anchor set's encoded chunks (read on the error path only)."""

    def as_stored(value):  # as meta.json has it (tuples become lists)
        return json.loads(json.dumps(value, default=str))

    image = as_stored(anchor_image_identity(cfg, anchors))
    text_encoder = as_stored(text_identity(cfg.encoder.text))
    sizes = set()
    for meta_file in cache.root.glob("*/meta.json"):
        try:
            identity = json.loads(meta_file.read_text())["identity"]
        except (OSError, ValueError, KeyError):
            continue
        if (
            identity.get("kind") == "anchor_chunk"
            and identity.get("image") == image
            and identity.get("text_encoder") == text_encoder
            and identity["stop"] < len(anchors.captions)  # the last chunk may be shorter
        ):
            sizes.add(identity["stop"] - identity["start"])
    return sizes


def _all_cached(cache: EmbeddingCache, cfg, anchors: AnchorSet, chunks: list) -> bool:
    # Cheap presence check; merge_chunks verifies every entry's checksum when it loads it.
    return all(cache.path(chunk_identity(cfg, anchors, a, b)).exists() for a, b in chunks)


@hydra.main(version_base="1.3", config_path="../conf", config_name="extract")
def main(cfg: DictConfig) -> None:
    log.debug("config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
    with user_errors_in_one_line():
        run_extract(cfg)


if __name__ == "__main__":
    run_cli(main)
