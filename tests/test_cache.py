"""The embedding cache: hits, misses on any identity change, and damaged entries recomputed."""

import json
import logging

import torch

from asif_exp.embeddings import EmbeddingCache


def counting_compute(value: float):
    calls = []

    def compute():
        calls.append(1)
        return {"embeddings": torch.full((3, 4), value)}, {"failures": []}

    return compute, calls


IDENTITY = {"kind": "image", "encoder": {"name": "e"}, "data": {"ids_sha": "abc"}}


def test_hit_after_miss(tmp_path):
    cache = EmbeddingCache(tmp_path)
    compute, calls = counting_compute(1.0)
    first, _, cached_first = cache.get_or_compute(IDENTITY, compute)
    second, extra, cached_second = cache.get_or_compute(IDENTITY, compute)
    assert (cached_first, cached_second, len(calls)) == (False, True, 1)
    assert torch.equal(first["embeddings"], second["embeddings"]) and extra == {"failures": []}
    assert not list(cache.root.glob(".staging-*"))  # nothing half-written left behind


def test_any_identity_change_is_a_miss(tmp_path):
    cache = EmbeddingCache(tmp_path)
    compute, calls = counting_compute(1.0)
    cache.get_or_compute(IDENTITY, compute)
    cache.get_or_compute({**IDENTITY, "data": {"ids_sha": "abd"}}, compute)
    cache.get_or_compute({**IDENTITY, "encoder": {"name": "e", "precision": "float16"}}, compute)
    assert len(calls) == 3


def test_disabled_cache_always_computes(tmp_path):
    cache = EmbeddingCache(tmp_path, enabled=False)
    compute, calls = counting_compute(1.0)
    cache.get_or_compute(IDENTITY, compute)
    cache.get_or_compute(IDENTITY, compute)
    assert len(calls) == 2 and not cache.root.exists()


def damage_truncate(entry):
    tensor_file = entry / "embeddings.safetensors"
    tensor_file.write_bytes(tensor_file.read_bytes()[:-7])


def damage_flip_byte(entry):
    tensor_file = entry / "embeddings.safetensors"
    data = bytearray(tensor_file.read_bytes())
    data[-1] ^= 0xFF
    tensor_file.write_bytes(bytes(data))


def damage_meta(entry):
    (entry / "meta.json").write_text("{ not json")


def damage_remove_meta(entry):
    (entry / "meta.json").unlink()


def test_damaged_entries_are_detected_and_recomputed(tmp_path, caplog):
    for damage in (damage_truncate, damage_flip_byte, damage_meta, damage_remove_meta):
        cache = EmbeddingCache(tmp_path / damage.__name__)
        good, _ = counting_compute(1.0)
        cache.get_or_compute(IDENTITY, good)
        damage(cache.path(IDENTITY))
        compute, calls = counting_compute(2.0)
        with caplog.at_level(logging.WARNING):
            tensors, _, cached = cache.get_or_compute(IDENTITY, compute)
        assert not cached and len(calls) == 1, damage.__name__
        assert torch.equal(tensors["embeddings"], torch.full((3, 4), 2.0))
        assert "corrupt" in caplog.text
        # the recomputed entry is whole again
        assert json.loads((cache.path(IDENTITY) / "meta.json").read_text())["shapes"] == {
            "embeddings": [3, 4]
        }
        assert cache.get_or_compute(IDENTITY, compute)[2] is True


def test_failed_compute_leaves_no_entry(tmp_path):
    cache = EmbeddingCache(tmp_path)

    def broken():
        raise RuntimeError("encoder crashed")

    try:
        cache.get_or_compute(IDENTITY, broken)
    except RuntimeError:
        pass
    assert not cache.path(IDENTITY).exists()
    assert not list(cache.root.glob(".staging-*")) if cache.root.exists() else True


def test_a_subset_is_cut_from_its_cached_full_set_without_encoding(tmp_path, monkeypatch):
    from conftest import TINY, compose_config

    from asif_exp import pipeline
    from asif_exp.data import Subset, load_benchmark

    cfg = compose_config([*TINY, f"paths.cache_dir={tmp_path}"])
    full = load_benchmark(cfg.benchmark, cfg.paths.data_root).images
    embeddings, kept, _ = pipeline.Embedder(cfg).images(full, "full")

    def no_encoder(*args):
        raise AssertionError("the subset was encoded again")

    monkeypatch.setattr(pipeline, "ImageEncoder", no_encoder)
    indices = [40, 3, 17, 3]
    subset_embeddings, subset_kept, failures = pipeline.Embedder(cfg).images(
        Subset(full, indices), "subset"
    )
    assert subset_kept == [0, 1, 2, 3] and failures == []
    assert torch.equal(subset_embeddings, embeddings[[kept.index(i) for i in indices]])
