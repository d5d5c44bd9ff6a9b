"""Step 1 of the paper's recipe: the first N rows of CC12M as img2dataset webdataset shards.

    python experiments/table1/cc12m.py download --tsv cc12m.tsv --rows 1600000 \
        --out "$ASIF_DATA_ROOT/cc12m"
    python experiments/table1/cc12m.py check --out "$ASIF_DATA_ROOT/cc12m" --rows 1600000

`download` is safe to rerun after any failure; each part resumes:
1. img2dataset (pinned) gets its own venv, `.venvs/img2dataset`, created once: installed into
   the project's environment it downgrades pandas and pulls opencv and albumentations.
2. The TSV is converted to parquet here, in Python, because img2dataset reads TSV with a CSV
   parser whose quote character is `"`: a caption starting with `"` is altered or swallows the
   rows after it. Rewritten only when missing or made from another TSV or row count.
3. img2dataset runs every time: it skips the shards that have their `NNNNN_stats.json` (written
   when a shard is complete) and redoes the others. Never write a .json file into the output
   folder: img2dataset reads every `*.json` there as a finished shard's stats.
4. `check`: every shard finished (its `_stats.json`, parquet and tar are there), every parquet
   readable, and the rows listed add up to the rows asked for. A failed download is a listed
   row with `status != "success"` and no image in the tar; CC12M always has some.

IMG2DATASET_FLAGS below are the paper setting; only the scale (`--shard-size`, `--processes`,
`--threads`) is a command-line option, so the offline rehearsal uses exactly these flags.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
IMG2DATASET_VERSION = "1.47.0"
DEFAULT_VENV = PROJECT_ROOT / ".venvs" / "img2dataset"  # git-ignored; reused by later runs
SHARD_DIGITS = 5  # img2dataset's oom_shard_count: shard files are NNNNN.tar/.parquet

# `--skip_reencode True`: a JPEG that needs no resize keeps its downloaded bytes. Without it
# every image is decoded and re-encoded at quality 95, which changes the numbers (Flickr8k,
# 380 anchors: top-1 0.328 re-encoded against 0.358 from the original files). Images whose
# shorter side is above --image_size are still resized and re-encoded; PNG/WebP/GIF downloads
# are converted to JPEG.
IMG2DATASET_FLAGS = [
    "--input_format", "parquet",
    "--url_col", "url",
    "--caption_col", "caption",
    "--output_format", "webdataset",
    "--image_size", "384",
    "--resize_mode", "keep_ratio",
    "--resize_only_if_bigger", "True",
    "--skip_reencode", "True",
    "--encode_format", "jpg",
    "--encode_quality", "95",
    "--incremental_mode", "incremental",
    "--retries", "1",
    "--timeout", "10",
    "--enable_wandb", "False",
]  # fmt: skip


class RecipeError(RuntimeError):
    """A step of the download could not complete; the message names the file and the fix."""


# ----------------------------------------------------------------------------- the img2dataset venv


def ensure_img2dataset(venv: Path, python: str) -> Path:
    """The img2dataset executable of its own venv, created (once) when missing or unfinished."""
    executable, marker = venv / "bin" / "img2dataset", venv / ".asif-installed"
    if marker.is_file() and marker.read_text().strip() == IMG2DATASET_VERSION:
        return executable
    if venv.exists():  # a half-made venv (killed install): start again
        shutil.rmtree(venv)
    print(f"cc12m: creating {venv} (img2dataset=={IMG2DATASET_VERSION})", flush=True)
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"img2dataset=={IMG2DATASET_VERSION}"], check=True)
    marker.write_text(IMG2DATASET_VERSION + "\n")
    return executable


# ----------------------------------------------------------------------------- TSV -> parquet


def read_tsv_rows(tsv: Path, rows: int) -> tuple[list[str], list[str]]:
    """The first `rows` lines of CC12M's TSV (url TAB caption, no header), bytes as they are:
    no quote handling, so a caption may start with or contain `"`."""
    urls, captions = [], []
    with open(tsv, encoding="utf-8", newline="") as lines:
        for number, line in enumerate(lines, 1):
            if len(urls) == rows:
                break
            url, tab, caption = line.rstrip("\r\n").partition("\t")
            if not tab or not url:
                raise RecipeError(f"{tsv}, line {number}: expected 'url<TAB>caption', got {line!r}")
            urls.append(url)
            captions.append(caption)
    if len(urls) < rows:
        raise RecipeError(f"{tsv}: {len(urls)} rows, fewer than the {rows} asked for (--rows)")
    return urls, captions


def tsv_to_parquet(tsv: Path, rows: int, out: Path) -> bool:
    """Write the first `rows` pairs as a url/caption parquet; False when it is already there."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = {"tsv": tsv.name, "tsv_bytes": str(tsv.stat().st_size), "rows": str(rows)}
    if out.is_file():
        try:
            existing = pq.ParquetFile(out)
            metadata = {k.decode(): v.decode() for k, v in existing.schema_arrow.metadata.items()}
            if all(metadata.get(k) == v for k, v in source.items()):
                return False
        except Exception:  # unreadable or foreign: rewrite it
            pass
    urls, captions = read_tsv_rows(tsv, rows)
    table = pa.table({"url": urls, "caption": captions}).replace_schema_metadata(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    pq.write_table(table, staging)
    os.replace(staging, out)
    return True


# ----------------------------------------------------------------------------- completeness


def shard_name(shard: int) -> str:
    return f"{shard:0{SHARD_DIGITS}d}"


def check_shards(folder: Path, rows: int, shard_size: int) -> dict:
    """Every shard of an img2dataset webdataset output finished, and the rows add up.

    Raises RecipeError naming the first problem (and the rerun that fixes it); returns the
    counts: shards, rows listed, downloaded, failed.
    """
    import pyarrow.parquet as pq

    if not folder.is_dir():
        raise RecipeError(f"{folder}: no such folder; run the download step")
    expected = math.ceil(rows / shard_size)
    rerun = "rerun the download step (img2dataset redoes unfinished shards)"
    totals = {"shards": expected, "rows": 0, "downloaded": 0, "failed": 0}
    for shard in range(expected):
        name = shard_name(shard)
        stats_file, parquet_file = folder / f"{name}_stats.json", folder / f"{name}.parquet"
        if not stats_file.is_file():
            raise RecipeError(f"{stats_file}: missing, shard {name} did not finish; {rerun}")
        stats = json.loads(stats_file.read_text())
        for path in (parquet_file, folder / f"{name}.tar"):
            if not path.is_file():
                raise RecipeError(f"{path}: missing although {stats_file.name} exists; {rerun}")
        try:
            listed = pq.ParquetFile(parquet_file).metadata.num_rows
        except Exception as error:
            message = f"{parquet_file}: unreadable ({type(error).__name__}: {error})"
            raise RecipeError(f"{message}; delete {stats_file.name} and {rerun}") from None
        want = min(shard_size, rows - shard * shard_size)
        if listed != stats["count"] or listed != want:
            raise RecipeError(
                f"{parquet_file}: {listed} rows, its stats say {stats['count']}, the shard "
                f"should have {want}; was the folder made with other --rows or --shard-size?"
            )
        totals["rows"] += listed
        totals["downloaded"] += stats["successes"]
        totals["failed"] += listed - stats["successes"]
    extra = sorted(
        p.name for p in folder.glob("*_stats.json") if int(p.name.split("_")[0]) >= expected
    )
    if extra:
        raise RecipeError(
            f"{folder}: shards beyond the {expected} expected ({extra[:3]}...): made with more "
            "--rows or a smaller --shard-size; use another output folder"
        )
    if totals["rows"] != rows:  # cannot happen when every shard has its size; kept as a guard
        raise RecipeError(f"{folder}: {totals['rows']} rows listed, {rows} asked for")
    return totals


def describe(totals: dict) -> str:
    share = totals["downloaded"] / totals["rows"]
    return (
        f"{totals['shards']} shards complete, {totals['rows']:,} rows listed, "
        f"{totals['downloaded']:,} downloaded ({share:.1%}), {totals['failed']:,} failed"
    )


# ----------------------------------------------------------------------------- the step


def img2dataset_command(
    executable: Path, url_list: Path, out: Path, shard_size: int, processes: int, threads: int
) -> list[str]:
    return [
        str(executable),
        "--url_list", str(url_list),
        "--output_folder", str(out),
        *IMG2DATASET_FLAGS,
        "--number_sample_per_shard", str(shard_size),
        "--processes_count", str(processes),
        "--thread_count", str(threads),
    ]  # fmt: skip


def download(args: argparse.Namespace) -> dict:
    out = args.out.resolve()
    # The url list sits beside the output folder: a .parquet inside it would be read as a shard.
    url_list = out.with_name(f"{out.name}_first_{args.rows}.parquet")
    executable = ensure_img2dataset(args.venv, args.venv_python)
    if tsv_to_parquet(args.tsv, args.rows, url_list):
        print(f"cc12m: {url_list} written ({args.rows:,} rows of {args.tsv})", flush=True)
    command = img2dataset_command(
        executable, url_list, out, args.shard_size, args.processes, args.threads
    )
    print("cc12m: " + " ".join(command), flush=True)
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    subprocess.run(command, check=True, env=env)
    totals = check_shards(out, args.rows, args.shard_size)
    print(f"cc12m: {out}: {describe(totals)}", flush=True)
    return totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("download", "check"):
        command = commands.add_parser(name)
        command.add_argument("--out", type=Path, required=True, help="img2dataset output folder")
        command.add_argument("--rows", type=int, default=1_600_000, help="the first N rows")
        command.add_argument("--shard-size", type=int, default=10_000, help="rows per shard")
        if name == "download":
            command.add_argument("--tsv", type=Path, required=True, help="CC12M's cc12m.tsv")
            command.add_argument("--processes", type=int, default=16)
            command.add_argument("--threads", type=int, default=64)
            command.add_argument("--venv", type=Path, default=DEFAULT_VENV)
            command.add_argument(
                "--venv-python", default="python3", help="Python for img2dataset's venv (<=3.12)"
            )
    args = parser.parse_args(argv)
    try:
        if args.command == "download":
            download(args)
        else:
            print(
                f"cc12m: {args.out}: {describe(check_shards(args.out, args.rows, args.shard_size))}"
            )
    except RecipeError as error:
        print(f"cc12m: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
