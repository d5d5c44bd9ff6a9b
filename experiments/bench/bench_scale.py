"""Benchmark: anchors at CC12M scale, streamed from disk, on 1 and on 2 processes (gloo).

Writes `--anchors` synthetic anchor pairs (d = 384 on both sides, float16; 12M pairs: 18.4 GB)
as extraction writes them: chunk entries of the embedding cache under `--workdir`, linked
(hard links) into the two anchor entries a run looks up; generated and written one chunk at a
time, never all in memory (kept for the next run: delete `--workdir` afterwards). Then runs one
grid (n in 1.6M, 3.2M, 6.4M and all anchors, scaled for fewer anchors; k in 200, 800; p in 2, 8)
for `--queries` images and `--prompts` class prompts through what `python -m asif_exp` runs on a
cache: `EmbeddingCache.load_rows` (anchors as lazy `ChunkedRows`) and `score_grid` (one pass per
side, sharded by `topk.sharded_topk` when several processes run it), once with 1 process and once
with 2 (torch.distributed, gloo, 127.0.0.1), each process its own Python, as torchrun
starts them. The 2 CPU threads are split between the processes.

Prints, per n: the time of the top-k pass to n (both sides) and of the similarity products
alone in it; per run: wall time, scoring time and the peak anonymous memory (RssAnon sampled
from /proc, not page cache) of each process; then `peak memory / anchor bytes` (the largest sum
over the processes of a run of their peak RssAnon, over the bytes of both anchor sets on disk)
and `2 processes vs 1: identical predictions in N/N cells`.

    python experiments/bench/bench_scale.py --anchors 12000000 --workdir /work/scale-bench
    python experiments/bench/bench_scale.py --anchors 20000 --workdir /tmp/scale   # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from asif_exp import distributed  # noqa: E402
from asif_exp.embeddings import EmbeddingCache  # noqa: E402
from asif_exp.extract import renamed  # noqa: E402
from asif_exp.methods import asif  # noqa: E402
from asif_exp.methods.asif import topk  # noqa: E402

# The grid of the issue, for 12M anchors: n scales with --anchors.
N_FRACTIONS = (1.6 / 12, 3.2 / 12, 6.4 / 12, 1.0)
KS, PS = [200, 800], [2.0, 8.0]
DIM, CLASSES = 384, 100
THREADS = 2  # this machine's cores, split between the processes of a run
SAMPLE_S = 0.05


def identities(anchors: int, dim: int) -> dict[str, dict]:
    data = {"source": "bench_scale", "pairs": anchors, "dim": dim, "seed": 0}
    base = {"encoder": {"name": "synthetic"}, "data": data, "dtype": "float16"}
    return {"image": {"kind": "image", **base}, "text": {"kind": "text", **base}}


def chunk_identity(anchors: int, dim: int, start: int, stop: int) -> dict:
    return {
        "kind": "anchor_chunk",
        **identities(anchors, dim)["image"],
        "start": start,
        "stop": stop,
    }


def write_anchors(cache: EmbeddingCache, anchors: int, dim: int, chunk_rows: int) -> None:
    """Chunk entries (each generated, written and hashed alone), then the two anchor entries made
    of their files, as `extract.merge_chunks` makes them."""
    ids = identities(anchors, dim)
    if cache.entry(ids["image"]) and cache.entry(ids["text"]):
        print(f"anchors: {anchors:,} pairs already in {cache.root}")
        return
    started = time.perf_counter()
    parts = []
    for number, start in enumerate(range(0, anchors, chunk_rows)):
        stop = min(start + chunk_rows, anchors)
        identity = chunk_identity(anchors, dim, start, stop)
        if cache.entry(identity) is None:
            generator = torch.Generator().manual_seed(number)
            tensors = {
                "image_embeddings": torch.randn(stop - start, dim, generator=generator),
                "kept": torch.arange(start, stop),
                "text_embeddings": torch.randn(stop - start, dim, generator=generator),
            }
            cache.save(identity, tensors, {"failures": []}, torch.float16)
            del tensors
        parts.append(cache.entry(identity))
    image = [
        renamed(c, {"embeddings": "image_embeddings", "kept": "kept"})
        for p in parts
        for c in p.chunks
    ]
    text = [renamed(c, {"embeddings": "text_embeddings"}) for p in parts for c in p.chunks]
    cache.save_linked(ids["image"], image, {"failures": []})
    cache.save_linked(ids["text"], text, {})
    seconds = time.perf_counter() - started
    print(f"anchors: wrote {anchors:,} pairs in {len(parts)} chunks, {seconds:.0f} s")


def grid_ns(anchors: int) -> list[int]:
    return sorted({max(1, round(anchors * f)) for f in N_FRACTIONS})


def problem(queries: int, prompts: int, dim: int) -> dict:
    generator = torch.Generator().manual_seed(12345)
    return {
        "images": torch.randn(queries, dim, generator=generator),
        "prompts": torch.randn(prompts, dim, generator=generator),
        "prompt_class": torch.arange(prompts) % CLASSES,
    }


# ----------------------------------------------------------------------------- one process


class PassClock:
    """Times, per side, the top-k pass to each snapshot and the similarity products in it."""

    def __init__(self):
        self.products = 0.0
        self.passes: list[
            list[tuple[float, float]]
        ] = []  # per pass: (seconds, products) at each snapshot

    def install(self) -> None:
        streaming_topk, similarities = topk.streaming_topk, topk.similarities
        snapshot = topk.CandidatePool.snapshot

        def timed_pass(*args, **kwargs):
            self.passes.append([])
            self.started, self.products = time.perf_counter(), 0.0
            return streaming_topk(*args, **kwargs)

        def timed_products(*args):
            t = time.perf_counter()
            out = similarities(*args)
            self.products += time.perf_counter() - t
            return out

        def timed_snapshot(pool):
            out = snapshot(pool)
            self.passes[-1].append((time.perf_counter() - self.started, self.products))
            return out

        topk.streaming_topk, topk.similarities = timed_pass, timed_products
        topk.CandidatePool.snapshot = timed_snapshot


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", THREADS)))
    distributed.setup("cpu")
    rank, size = distributed.rank(), distributed.world_size()
    work = Path(args.workdir)
    cache = EmbeddingCache(work / "cache")
    ids = identities(args.anchors, args.dim)
    anchor_images = cache.load_rows(ids["image"])[0]["embeddings"]  # what the Embedder reads
    anchor_texts = cache.load_rows(ids["text"])[0]["embeddings"]
    given = torch.load(work / "problem.pt")
    inputs = asif.GridInputs(
        given["images"],
        anchor_images,
        given["prompts"],
        anchor_texts,
        given["prompt_class"],
        CLASSES,
    )
    clock = PassClock()
    clock.install()
    ns = grid_ns(args.anchors)
    started = time.perf_counter()
    report: dict = {}
    options = asif.AsifOptions(device="cpu")
    predictions = {}
    for params, scores in asif.score_grid(inputs, ns, KS, PS, options, report, progress=False):
        predictions[f"{params['n']},{params['k']},{params['p']}"] = scores.argmax(1)
    low, high = topk.shard_range(ns[-1], rank, size)
    local = sorted({min(n, high) - low for n in ns if n > low})
    at_n = {}  # n -> per side (seconds, products) when this rank's share of n was done
    for n in ns:
        if n > low:
            position = local.index(min(n, high) - low)
            at_n[n] = [side[position] for side in clock.passes]
    record = {
        "rank": rank,
        "world": size,
        "wall_s": time.perf_counter() - started,
        "topk_s": report["topk_s"],
        "scoring_s": report.get("scoring_s", 0.0),
        "at_n": at_n,
    }
    out = work / f"run-{size}"
    out.mkdir(exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    if rank == 0:
        torch.save(predictions, out / "predictions.pt")


# ----------------------------------------------------------------------------- the driver


def rss_anon_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: argparse.Namespace, size: int) -> dict:
    """`size` worker processes, as torchrun starts them; their peak RssAnon, sampled."""
    port = free_port()
    processes = []
    for rank in range(size):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": str(max(1, THREADS // size)),
            "PYTHONPATH": str(ROOT),
        }
        command = [sys.executable, __file__, "--worker", *sys.argv[1:]]
        processes.append(subprocess.Popen(command, env=env))
    peaks = [0] * size
    started = time.perf_counter()
    while any(p.poll() is None for p in processes):
        for i, p in enumerate(processes):
            peaks[i] = max(peaks[i], rss_anon_kb(p.pid))
        time.sleep(SAMPLE_S)
    wall = time.perf_counter() - started
    if any(p.returncode for p in processes):
        raise SystemExit(f"a worker of the {size}-process run failed")
    out = Path(args.workdir) / f"run-{size}"
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(size)]
    return {
        "wall_s": wall,
        "peaks_kb": peaks,
        "ranks": ranks,
        "predictions": torch.load(out / "predictions.pt"),
    }


def per_n(result: dict, n: int) -> tuple[float, float]:
    """(seconds, products) of the top-k pass to n: per side, the slowest rank; both sides."""
    seconds = products = 0.0
    sides = max(len(r["at_n"].get(str(n), [])) for r in result["ranks"])
    for side in range(sides):
        done = [r["at_n"][str(n)][side] for r in result["ranks"] if str(n) in r["at_n"]]
        seconds += max(s for s, _ in done)
        products += max(p for _, p in done)
    return seconds, products


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--anchors", type=int, default=12_000_000)
    parser.add_argument("--workdir", required=True, help="where the anchors are written (and kept)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=DIM)
    parser.add_argument("--chunk-rows", type=int, default=200_000, help="pairs per chunk entry")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cache = EmbeddingCache(work / "cache")
    write_anchors(cache, args.anchors, args.dim, args.chunk_rows)
    torch.save(problem(args.queries, args.prompts, args.dim), work / "problem.pt")
    ids = identities(args.anchors, args.dim)
    anchor_bytes = sum(
        cache.load_rows(ids[side])[0]["embeddings"].nbytes for side in ("image", "text")
    )
    ns = grid_ns(args.anchors)
    print(
        f"# bench_scale: {args.anchors:,} anchor pairs, d={args.dim} both sides, float16 on disk "
        f"({anchor_bytes / 1e9:.2f} GB, both sets); {args.queries} queries, {args.prompts} prompts "
        f"({CLASSES} classes); n={ns} k={KS} p={PS}; {THREADS} CPU threads per run",
        flush=True,
    )
    print(f"{'processes':>9} {'n':>11} {'top-k to n (s)':>15} {'products (s)':>13}")
    results = {}
    for size in (1, 2):  # each run's lines as soon as it is done
        result = results[size] = run(args, size)
        for n in ns:
            seconds, products = per_n(result, n)
            print(f"{size:>9} {n:>11,} {seconds:>15.1f} {products:>13.1f}")
        peaks = ", ".join(
            f"rank {r}: {kb / 1024:.0f} MB" for r, kb in enumerate(result["peaks_kb"])
        )
        scoring = result["ranks"][0]["scoring_s"]
        print(
            f"{size} process{'es' if size > 1 else ''}: wall {result['wall_s']:.1f} s "
            f"(top-k {result['ranks'][0]['topk_s']:.1f} s, scoring {scoring:.1f} s); "
            f"peak RssAnon {peaks}",
            flush=True,
        )
    peak = max(sum(result["peaks_kb"]) * 1024 for result in results.values())
    print(f"peak memory / anchor bytes: {peak / anchor_bytes:.2f}x")
    one, two = results[1]["predictions"], results[2]["predictions"]
    same = sum(1 for cell in one if cell in two and torch.equal(one[cell], two[cell]))
    print(f"2 processes vs 1: identical predictions in {same}/{len(one)} cells")


if __name__ == "__main__":
    main()
