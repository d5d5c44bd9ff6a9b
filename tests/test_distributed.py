"""The sharded top-k pass (torch.distributed, gloo on 127.0.0.1): N processes give exactly the
predictions and metrics of one, ties included."""

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import TINY, subprocess_env

TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(command: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=subprocess_env(HYDRA_FULL_ERROR="1", OMP_NUM_THREADS="1", **env),
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def torchrun(nproc: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
    ]


def test_distributed_two_gloo_processes_give_every_cell_of_one(tmp_path):
    cache = tmp_path / "cache"
    common = [f"paths.cache_dir={cache}", "device=cpu"]
    anchors_only = [o for o in TINY if o.split(".")[0] in ("anchors", "encoder", "progress=false")]
    # The anchors extracted in chunks of 40 pairs, as at scale: runs read them chunk by chunk.
    run(
        [
            sys.executable,
            "-m",
            "asif_exp.extract",
            f"hydra.run.dir={tmp_path / 'extract'}",
            "anchors=synthetic_shapes",
            *anchors_only,
            *common,
            "extract.chunk_size=40",
        ],
        tmp_path,
    )
    common += TINY
    grid = ["asif.n=[30,75,150]", "asif.k=[5,20,40]", "asif.p=[1,3]"]
    one, two = tmp_path / "one", tmp_path / "two"
    run([sys.executable, "-m", "asif_exp", f"hydra.run.dir={one}", *common, *grid], tmp_path)
    run([*torchrun(2), "-m", "asif_exp", f"hydra.run.dir={two}", *common, *grid], tmp_path)
    single, sharded = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert single["notes"].pop("world_size") == 1 and sharded["notes"].pop("world_size") == 2
    assert len(single["cells"]) == 3 * 3 * 2 - 2  # (k=40 > n=30 skipped)
    assert sharded["cells"] == single["cells"]  # every metric of every cell
    assert sharded["headline_params"] == single["headline_params"]
    assert sharded["notes"] == single["notes"]
    from_cache = single["embeddings_from_cache"]  # the anchors: the extraction's chunks
    assert from_cache["anchors synthetic_shapes"] and from_cache["anchor captions synthetic_shapes"]
    assert all(sharded["embeddings_from_cache"].values())  # rank 0 filled the cache first
    # rank 1 wrote nothing beside rank 0 in the shared output directory
    files = {p.relative_to(d).as_posix() for d in (one, two) for p in d.rglob("*")}
    assert sorted(p.relative_to(two).as_posix() for p in two.rglob("*")) == sorted(
        p.relative_to(one).as_posix() for p in one.rglob("*")
    ), files


# Each rank: the sharded pass over anchors with many exact ties (integer coordinates), against
# one process's streaming pass; rank 0 writes whether every snapshot is identical.
TIES_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from asif_exp import distributed
    from asif_exp.methods.asif import AsifOptions, streaming_topk
    from asif_exp.methods.asif.topk import sharded_topk
    from asif_exp.tensors import unit_rows

    distributed.setup("cpu")
    generator = torch.Generator().manual_seed(0)
    queries = torch.randint(-2, 3, (23, 6), generator=generator).float()
    anchors = torch.randint(-2, 3, (997, 6), generator=generator).float()
    ns, options = [3, 50, 333, 600, 997], AsifOptions(device="cpu")
    sharded = sharded_topk(
        unit_rows(queries), anchors, ns, 40, options, progress=False, normalize_anchors=True
    )
    single = streaming_topk(unit_rows(queries), unit_rows(anchors), ns, 40, options, progress=False)
    same = {
        n: torch.equal(sharded[n].indices, single[n].indices)
        and torch.equal(sharded[n].values, single[n].values)
        for n in ns
    }
    if distributed.is_main():
        json.dump({"same": same, "world": distributed.world_size()}, open(sys.argv[1], "w"))
    """
)


@pytest.mark.parametrize("nproc", [2, 3])
def test_distributed_sharded_topk_equals_one_pass_with_ties(tmp_path, nproc):
    script, out = tmp_path / "ties.py", tmp_path / "same.json"
    script.write_text(TIES_SCRIPT)
    run([*torchrun(nproc), str(script), str(out)], tmp_path)
    result = json.loads(out.read_text())
    assert result["world"] == nproc and all(result["same"].values()), result


def test_a_lazy_anchor_matrix_gives_the_tensors_top_k(tmp_path):
    from test_cache import linked_entry

    from asif_exp.embeddings import EmbeddingCache
    from asif_exp.methods.asif import AsifOptions, streaming_topk
    from asif_exp.tensors import unit_rows

    cache, whole = linked_entry(tmp_path, chunk_rows=(40, 0, 33, 57))
    lazy = cache.load_rows({"kind": "image", "encoder": {"name": "e"}, "data": {"ids_sha": "abc"}})
    rows = lazy[0]["embeddings"]
    queries = unit_rows(torch.randn(9, 3))
    options = AsifOptions(device="cpu")
    expected = streaming_topk(queries, unit_rows(whole), [10, 70, 130], 12, options, progress=False)
    got = streaming_topk(
        queries, rows, [10, 70, 130], 12, options, progress=False, normalize_anchors=True
    )
    for n in (10, 70, 130):
        assert torch.equal(got[n].indices, expected[n].indices)
        assert torch.equal(got[n].values, expected[n].values)
    assert isinstance(EmbeddingCache, type)
