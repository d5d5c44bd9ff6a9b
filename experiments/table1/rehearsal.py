"""Helpers of rehearse_offline.sh: the CC12M lane at small scale, offline.

    serve        a static server for --www on 127.0.0.1 and a free port (written to --port-file).
    source       images and a CC12M-style TSV (url TAB caption, no header) served from
                 127.0.0.1: synthetic shapes (default) or Flickr8k from the data root; every
                 `--dead-every`-th link is dead, one serves bytes that are not an image, and
                 captions start with or contain `"`. Also writes expected.json.
    verify       the img2dataset output against expected.json: every row listed once with the
                 dataset's caption, failed rows failed, served JPEGs stored byte for byte.
    kill-job     waits until a Hydra job has encoded a chunk, then kill -9s that job's process.
    fan-out      the extract.json of each job of a fan-out: chunks encoded and taken from cache.
    pairs-file   the downloaded pairs (dataset order) as image files and a pairs.jsonl.
    compare      two results.json files have identical numbers.

tests/fixtures/make_img2dataset_fixture.py uses `write_source` and `serve` as well.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import http.server
import io
import json
import os
import signal
import sys
import tarfile
import threading
import time
from pathlib import Path

QUOTED_CAPTIONS = {  # row -> caption: img2dataset's TSV reader mangles these
    1: '"Quoted" words start this caption',
    2: 'a caption with "quotes" inside and a trailing "',
    3: '"',
}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _synthetic_images(count: int, size: int) -> list[tuple[bytes, str]]:
    from asif_exp.data.synthetic import SyntheticShapes

    shapes = SyntheticShapes(seed=7, start=0, count=count, image_size=size, label_attribute="shape")
    images = []
    for index in range(count):
        buffer = io.BytesIO()
        shapes.load(index).save(buffer, format="JPEG", quality=90)
        images.append((buffer.getvalue(), shapes.captions[index]))
    return images


def _flickr8k_images(count: int, data_root: Path) -> list[tuple[bytes, str]]:
    folder = data_root / "flickr8k"
    lines = (folder / "captions.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines][: count * 5 : 5]  # first caption per image
    if len(records) < count:
        raise SystemExit(f"{folder}: {len(records)} images, fewer than {count}")
    return [((folder / r["image"]).read_bytes(), r["caption"]) for r in records]


def write_source(
    folder: Path,
    rows: int,
    port: int,
    dead_every: int = 10,
    images: str = "synthetic",
    data_root: Path | None = None,
    image_size: int = 224,
    delays: dict[int, float] | None = None,
) -> list[dict]:
    """`folder/www/` (what the server serves), `folder/cc12m.tsv` and `folder/expected.json`.

    Row i is dead (404) when i % dead_every == dead_every - 1; row `rows // 2` serves bytes that
    are not an image (unless that row is dead). `delays` (row -> seconds) makes the server hold
    those answers, so downloads finish out of order.
    """
    www = folder / "www"
    www.mkdir(parents=True, exist_ok=True)
    if images == "synthetic":
        sources = _synthetic_images(rows, image_size)
    elif images == "flickr8k":
        sources = _flickr8k_images(rows, data_root)
    else:
        raise SystemExit(f"--images {images!r}: expected synthetic or flickr8k")
    expected, lines = [], []
    for row, (data, caption) in enumerate(sources):
        caption = QUOTED_CAPTIONS.get(row, caption)
        name = f"{row:06d}.jpg"
        if row % dead_every == dead_every - 1:
            kind, name = "dead", f"gone/{name}"
        elif row == rows // 2:
            kind, data = "corrupt", b"<html>not an image</html>"
            (www / name).write_bytes(data)
        else:
            kind = "ok"
            (www / name).write_bytes(data)
        delay = (delays or {}).get(row)
        url = f"http://127.0.0.1:{port}/{name}" + (f"?delay={delay}" if delay else "")
        lines.append(f"{url}\t{caption}\n")
        sha = _sha(data) if kind == "ok" else None
        expected.append({"row": row, "url": url, "caption": caption, "kind": kind, "sha256": sha})
    (folder / "cc12m.tsv").write_text("".join(lines), encoding="utf-8")
    (folder / "expected.json").write_text(json.dumps(expected, indent=1))
    return expected


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files; `?delay=S` holds the answer S seconds. Quiet."""

    def do_GET(self):  # noqa: N802 (the http.server name)
        path, _, query = self.path.partition("?")
        if query.startswith("delay="):
            time.sleep(float(query.split("=", 1)[1]))
        self.path = path
        super().do_GET()

    def log_message(self, *args):
        pass


def serve(www: Path) -> tuple[http.server.ThreadingHTTPServer, int]:
    """Serve `www` on 127.0.0.1, a free port, from a daemon thread; returns (server, port)."""
    handler = functools.partial(_Handler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


# ----------------------------------------------------------------------------- reading shards


def read_shards(folder: Path) -> list[dict]:
    """Every row img2dataset listed, in file order, with the bytes of its .jpg member."""
    import pyarrow.parquet as pq

    rows = []
    for parquet in sorted(folder.glob("*.parquet")):
        with tarfile.open(parquet.with_suffix(".tar")) as tar:
            images = {
                m.name.split(".")[0]: tar.extractfile(m).read()
                for m in tar
                if m.name.endswith(".jpg")
            }
        for row in pq.read_table(parquet, columns=["key", "caption", "status"]).to_pylist():
            rows.append({**row, "shard": parquet.stem, "image": images.get(row["key"])})
    return rows


def verify(source: Path, shards: Path, rows: int) -> dict:
    """The download against what was served; raises SystemExit naming the first mismatch."""
    expected = json.loads((source / "expected.json").read_text())[:rows]
    listed = read_shards(shards)
    in_key_order = sorted(listed, key=lambda r: r["key"])
    if len(listed) != rows or len({r["key"] for r in listed}) != rows:
        raise SystemExit(f"verify: {len(listed)} rows listed in {shards}, expected {rows}")
    for want, got in zip(expected, in_key_order, strict=True):
        where = f"verify: row {want['row']} (key {got['key']}, {got['shard']}.parquet)"
        if got["caption"] != want["caption"]:
            raise SystemExit(f"{where}: caption {got['caption']!r}, served {want['caption']!r}")
        if (got["status"] == "success") != (want["kind"] == "ok"):
            raise SystemExit(f"{where}: status {got['status']} for a {want['kind']} link")
        if want["kind"] == "ok" and _sha(got["image"] or b"") != want["sha256"]:
            raise SystemExit(f"{where}: stored image differs from the served JPEG (re-encoded?)")
    moved = sum(a["key"] != b["key"] for a, b in zip(listed, in_key_order, strict=True))
    return {
        "rows": rows,
        "downloaded": sum(r["status"] == "success" for r in listed),
        "failed": sum(r["status"] != "success" for r in listed),
        "out_of_key_order": moved,
    }


def write_pairs_file(shards: Path, out: Path) -> int:
    """The downloaded pairs in dataset (key) order: out/images/<key>.jpg + out/pairs.jsonl."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for row in sorted(read_shards(shards), key=lambda r: r["key"]):
        if row["status"] != "success":
            continue
        name = f"images/{row['key']}.jpg"
        (out / name).write_bytes(row["image"])
        lines.append(json.dumps({"image": name, "caption": row["caption"]}) + "\n")
    (out / "pairs.jsonl").write_text("".join(lines))
    return len(lines)


# ----------------------------------------------------------------------------- kill one job


def _holder_of(path: Path) -> int | None:
    """The pid of a process that has `path` open (Linux /proc)."""
    target = str(path.resolve())
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) == target:
                    return int(proc.name)
        except OSError:  # gone, or not ours to read
            continue
    return None


def kill_job(log: Path, timeout: float) -> int:
    """kill -9 the process writing `log` once it has logged an encoded chunk; returns its pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text() if log.is_file() else ""
        if ": encoded (" in text:
            pid = _holder_of(log)
            if pid is None:
                raise SystemExit(f"kill-job: {log} shows progress but no process holds it")
            os.kill(pid, signal.SIGKILL)
            return pid
        time.sleep(0.05)
    raise SystemExit(f"kill-job: no chunk encoded in {log} within {timeout:.0f} s")


# ----------------------------------------------------------------------------- results


def compare(first: Path, second: Path) -> dict:
    """Identical metrics in every cell. n itself may differ: on shards it counts listed pairs
    (failed downloads included), in a pairs file only the downloaded ones."""
    a, b = (json.loads(p.read_text()) for p in (first, second))

    def metrics(results: dict) -> list[dict]:
        return [{k: v for k, v in c.items() if k not in ("n", "n_used")} for c in results["cells"]]

    if a["anchors"]["pairs_used"] != b["anchors"]["pairs_used"]:
        raise SystemExit("compare: a different number of anchor pairs was used")
    for key in ("top1", "top5", "k", "p"):
        if a[key] != b[key]:
            raise SystemExit(f"compare: {key} differs: {a[key]} ({first}) vs {b[key]} ({second})")
    if metrics(a) != metrics(b):
        raise SystemExit(f"compare: cells differ between {first} and {second}")
    numbers = ("top1", "top5", "k", "p")
    return {key: a[key] for key in numbers} | {
        "pairs_used": a["anchors"]["pairs_used"],
        "cells": len(a["cells"]),
    }


def fan_out_report(sweep: Path) -> dict:
    reports = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/extract.json"))]
    if not reports:
        raise SystemExit(f"fan-out: no extract.json under {sweep}")
    return {
        "jobs": len(reports),
        "chunks_encoded": sum(len(r["chunks_encoded"]) for r in reports),
        "chunks_cached": sum(len(r["chunks_cached"]) for r in reports),
        "chunks_total": reports[0]["chunks_total"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    server = commands.add_parser("serve")
    server.add_argument("--www", type=Path, required=True)
    server.add_argument("--port-file", type=Path, required=True)
    source = commands.add_parser("source")
    source.add_argument("--out", type=Path, required=True)
    source.add_argument("--rows", type=int, required=True)
    source.add_argument("--port", type=int, required=True)
    source.add_argument("--dead-every", type=int, default=10)
    source.add_argument("--images", default="synthetic", help="synthetic or flickr8k")
    source.add_argument("--data-root", type=Path)
    source.add_argument("--image-size", type=int, default=224, help="synthetic images")
    check = commands.add_parser("verify")
    check.add_argument("--source", type=Path, required=True)
    check.add_argument("--shards", type=Path, required=True)
    check.add_argument("--rows", type=int, required=True)
    fan = commands.add_parser("fan-out")
    fan.add_argument("sweep", type=Path)
    kill = commands.add_parser("kill-job")
    kill.add_argument("--log", type=Path, required=True)
    kill.add_argument("--timeout", type=float, default=300)
    pairs = commands.add_parser("pairs-file")
    pairs.add_argument("--shards", type=Path, required=True)
    pairs.add_argument("--out", type=Path, required=True)
    same = commands.add_parser("compare")
    same.add_argument("first", type=Path)
    same.add_argument("second", type=Path)
    args = parser.parse_args(argv)

    if args.command == "serve":
        _, port = serve(args.www)
        staging = args.port_file.with_name(args.port_file.name + ".tmp")
        staging.write_text(f"{port}\n")
        os.replace(staging, args.port_file)
        threading.Event().wait()  # until killed
    elif args.command == "source":
        rows = write_source(
            args.out,
            args.rows,
            args.port,
            args.dead_every,
            args.images,
            args.data_root,
            args.image_size,
        )
        kinds = [r["kind"] for r in rows]
        print(f"source: {len(rows)} rows ({kinds.count('dead')} dead, {kinds.count('corrupt')} "
              f"not an image, {len(QUOTED_CAPTIONS)} quoted captions) in {args.out}")  # fmt: skip
    elif args.command == "verify":
        print("verify:", json.dumps(verify(args.source, args.shards, args.rows)))
    elif args.command == "kill-job":
        print(f"kill-job: killed pid {kill_job(args.log, args.timeout)} ({args.log.parent.name})")
    elif args.command == "fan-out":
        report = fan_out_report(args.sweep)
        print("fan-out:", json.dumps(report))
        if report["chunks_encoded"] + report["chunks_cached"] != report["chunks_total"]:
            raise SystemExit("fan-out: the jobs did not cover every chunk")
    elif args.command == "pairs-file":
        print(f"pairs-file: {write_pairs_file(args.shards, args.out)} pairs in {args.out}")
    else:
        print("compare: identical", json.dumps(compare(args.first, args.second)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
