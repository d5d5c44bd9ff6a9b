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


def tensor_file_of(entry):
    (tensor_file,) = entry.glob("chunk-*.safetensors")
    return tensor_file


def damage_truncate(entry):
    tensor_file = tensor_file_of(entry)
    tensor_file.write_bytes(tensor_file.read_bytes()[:-7])


def damage_flip_byte(entry):
    tensor_file = tensor_file_of(entry)
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


# ----------------------------------------------------------------------------- chunked entries


def write_old_entry(cache, identity, tensors, extra):
    """An entry exactly as the code before chunked entries wrote it (one file, no `chunks`)."""
    from safetensors.torch import save_file

    from asif_exp.embeddings import file_sha256, identity_key

    entry = cache.path(identity)
    entry.mkdir(parents=True)
    tensor_file = entry / "embeddings.safetensors"
    save_file(tensors, str(tensor_file))
    meta = {
        "identity_key": identity_key(identity),
        "identity": identity,
        "shapes": {k: list(v.shape) for k, v in tensors.items()},
        "bytes": tensor_file.stat().st_size,
        "sha256": file_sha256(tensor_file),
        "extra": extra,
    }
    (entry / "meta.json").write_text(json.dumps(meta, indent=1))
    return entry


def test_an_entry_written_before_chunks_is_read_as_it_was_written(tmp_path):
    cache = EmbeddingCache(tmp_path)
    tensors = {"embeddings": torch.randn(5, 3), "kept": torch.tensor([0, 1, 2, 4, 6])}
    write_old_entry(cache, IDENTITY, tensors, {"failures": [{"id": "x", "error": "e"}]})
    compute, calls = counting_compute(1.0)
    got, extra, cached = cache.get_or_compute(IDENTITY, compute)
    assert cached and not calls and extra == {"failures": [{"id": "x", "error": "e"}]}
    assert torch.equal(got["embeddings"], tensors["embeddings"])
    assert torch.equal(got["kept"], tensors["kept"])
    lazy, _ = cache.load_rows(IDENTITY)
    assert torch.equal(lazy["embeddings"].materialize(), tensors["embeddings"])


def test_a_damaged_old_entry_is_recomputed(tmp_path, caplog):
    cache = EmbeddingCache(tmp_path)
    entry = write_old_entry(cache, IDENTITY, {"embeddings": torch.randn(5, 3)}, {})
    damage_truncate_file = entry / "embeddings.safetensors"
    damage_truncate_file.write_bytes(damage_truncate_file.read_bytes()[:-3])
    compute, calls = counting_compute(2.0)
    with caplog.at_level(logging.WARNING):
        got, _, cached = cache.get_or_compute(IDENTITY, compute)
    assert not cached and calls and "corrupt" in caplog.text
    assert torch.equal(got["embeddings"], torch.full((3, 4), 2.0))


def test_a_chunk_is_hashed_only_when_its_stamp_changed(tmp_path, monkeypatch):
    from asif_exp import embeddings

    cache = EmbeddingCache(tmp_path)
    cache.get_or_compute(IDENTITY, counting_compute(1.0)[0])
    hashed = []
    real_sha = embeddings.file_sha256
    monkeypatch.setattr(embeddings, "file_sha256", lambda p: hashed.append(p) or real_sha(p))
    assert cache.load(IDENTITY) is not None and hashed == []  # the writer's stamp
    (cache.path(IDENTITY) / "verified.json").unlink()  # e.g. a read-only copy of the cache
    assert cache.load(IDENTITY) is not None and len(hashed) == 1
    assert cache.load(IDENTITY) is not None and len(hashed) == 1  # stamped again
    tensor_file = tensor_file_of(cache.path(IDENTITY))
    data = bytearray(tensor_file.read_bytes())
    data[-1] ^= 0xFF  # same size: only the stamp (mtime) tells
    tensor_file.write_bytes(bytes(data))
    assert cache.load(IDENTITY) is None and len(hashed) == 2


def test_storage_dtype_halves_the_entry_and_reads_back_float32(tmp_path):
    from asif_exp.embeddings import storage_dtype, with_storage_dtype
    from asif_exp.errors import ConfigError

    cache = EmbeddingCache(tmp_path)
    values = torch.randn(6, 4)
    for name in ("float16", "bfloat16"):
        identity = with_storage_dtype(IDENTITY, name)
        assert cache.path(identity) != cache.path(IDENTITY)
        dtype = storage_dtype(name)
        computed, _, _ = cache.get_or_compute(identity, lambda: ({"embeddings": values}, {}), dtype)
        read, _, cached = cache.get_or_compute(identity, None, dtype)
        assert cached and read["embeddings"].dtype == torch.float32
        assert torch.equal(read["embeddings"], values.to(dtype).float())
        assert torch.equal(computed["embeddings"], read["embeddings"])  # same either way
        lazy, _ = cache.load_rows(identity)
        assert lazy["embeddings"].dtype == dtype
    assert with_storage_dtype(IDENTITY, "float32") == IDENTITY  # old entries stay valid
    try:
        storage_dtype("int8")
        raise AssertionError("int8 accepted")
    except ConfigError as error:
        assert "cache_dtype" in str(error)


def linked_entry(tmp_path, chunk_rows=(4, 0, 3, 5)):
    """An entry made of several chunk entries' files, as extraction's merge makes it."""
    from asif_exp.embeddings import Chunk

    cache = EmbeddingCache(tmp_path)
    parts, sources = [], []
    for number, rows in enumerate(chunk_rows):
        part = torch.randn(rows, 3)
        identity = {"kind": "chunk", "number": number}
        cache.save(identity, {"vectors": part, "other": torch.randn(2, 2)}, {})
        chunk = cache.entry(identity).chunks[0]
        parts.append(part)
        sources.append(
            Chunk(
                chunk.file,
                chunk.bytes,
                chunk.sha256,
                {"embeddings": rows},
                {"embeddings": "vectors"},
            )
        )
    cache.save_linked(IDENTITY, sources, {"note": 1})
    return cache, torch.cat(parts)


def test_a_linked_entry_reads_its_chunks_lazily_across_borders(tmp_path):
    cache, whole = linked_entry(tmp_path)
    tensors, extra = cache.load_rows(IDENTITY)
    rows = tensors["embeddings"]
    assert extra == {"note": 1} and rows.shape == whole.shape and len(rows) == 12
    for start, stop in [(0, 12), (2, 9), (3, 4), (4, 7), (11, 12), (5, 5)]:
        assert torch.equal(rows.rows(start, stop), whole[start:stop])
    selection = [0, 2, 3, 7, 8, 11]
    view = rows[selection]
    assert torch.equal(view.materialize(), whole[selection])
    assert torch.equal(view[1:4].materialize(), whole[selection][1:4])
    assert torch.equal(rows[3:10][[0, 6]].materialize(), whole[3:10][[0, 6]])
    assert torch.equal(cache.load(IDENTITY)[0]["embeddings"], whole)
    # hard links: the anchors' entry takes no second copy of the chunks
    (first,) = cache.path(IDENTITY).glob("chunk-00000.safetensors")
    assert first.stat().st_nlink == 2


def test_a_damaged_chunk_of_a_linked_entry_is_detected(tmp_path, caplog):
    cache, _ = linked_entry(tmp_path)
    chunk = cache.path(IDENTITY) / "chunk-00002.safetensors"
    chunk.unlink()  # (a hard link: write a damaged copy in its place)
    chunk.write_bytes(b"\0" * 10)
    with caplog.at_level(logging.WARNING):
        assert cache.load_rows(IDENTITY) is None
    assert "chunk-00002" in caplog.text and not cache.path(IDENTITY).exists()
