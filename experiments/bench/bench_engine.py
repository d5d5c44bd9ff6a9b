"""Benchmark: the engine's one-pass (n, k, p) grid against the authors' published algorithm.

Synthetic unit-norm embeddings with a weak class structure (so accuracy is above chance and a
wrong implementation shows), generated on the target device. Both implementations run in this
process, one after the other, with the authors' options (negatives clamped by their zero buffer,
prompts normalised, best prompt decides); the script checks that they predict the same classes
and prints times, ratios (baseline / engine) and peak memory. See README.md in this folder.

    python experiments/bench/bench_engine.py --scale cpu
    python experiments/bench/bench_engine.py --scale paper --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from authors_baseline import zero_shot_classification  # noqa: E402

from asif_exp.methods.asif import AUTHORS_OPTIONS, AsifOptions, streaming_topk  # noqa: E402
from asif_exp.methods.asif.topk import similarities, tile_elements  # noqa: E402
from asif_exp.tasks.classification_grid import evaluate_grid  # noqa: E402
from asif_exp.tensors import unit_rows  # noqa: E402

GRID_NS = [10_000, 20_000, 50_000, 100_000, 200_000, 400_000, 800_000, 1_600_000]
GRID_KS = [50, 100, 200, 400, 800]
GRID_PS = [1.0, 2.0, 4.0, 8.0, 16.0]
SCALES = {
    # The CPU target: the whole grid with n up to 100k in under a minute on 2 cores.
    "cpu": dict(queries=5000, classes=100, templates=10, anchors=100_000, dim=384, budget_mb=1024),
    # The paper: 25k ImageNet validation images, 1000 classes x 7 templates, 1.6M CC12M pairs.
    "paper": dict(
        queries=25_000, classes=1000, templates=7, anchors=1_600_000, dim=768, budget_mb=8192
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--scale", choices=["cpu", "paper", "custom"], default="cpu")
    parser.add_argument("--queries", type=int, help="test images (default: from --scale)")
    parser.add_argument("--classes", type=int)
    parser.add_argument("--templates", type=int, help="prompts per class")
    parser.add_argument("--prompts", type=int, help="total prompts = classes x templates")
    parser.add_argument("--anchors", type=int, help="anchor pairs generated (largest n)")
    parser.add_argument("--dim", type=int, help="embedding width of both modalities")
    parser.add_argument("--ns", help="comma list (default: 10k..1.6M capped at --anchors)")
    parser.add_argument("--ks", default=",".join(map(str, GRID_KS)))
    parser.add_argument("--ps", default=",".join(map(str, GRID_PS)))
    parser.add_argument("--k", type=int, default=800, help="k of the single evaluation")
    parser.add_argument("--p", type=float, default=8.0, help="p of the single evaluation")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--dtype", default="auto", help="engine GEMM dtype: auto|float32|bfloat16|float16"
    )
    parser.add_argument("--memory-budget-mb", type=float, help="engine budget (default: by scale)")
    parser.add_argument("--baseline-gb", type=float, default=8.0, help="authors' max_gpu_mem_gb")
    parser.add_argument("--dic-size", type=int, default=100_000, help="authors' anchor chunk")
    parser.add_argument(
        "--baseline-grid",
        choices=["extrapolate", "measure", "skip"],
        default="extrapolate",
        help="measure: every k of the grid; extrapolate: only --k, times the number of ks",
    )
    parser.add_argument("--no-scaling", action="store_true", help="skip the time-vs-n runs")
    parser.add_argument(
        "--memory-scaling",
        help="comma list of n: peak memory of the streaming top-k pass against n (synthetic "
        "anchors of --dim; e.g. 125000,250000,500000,1000000), then exit",
    )
    parser.add_argument(
        "--memory-queries", type=int, default=1000, help="query rows of --memory-scaling"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        help="engine single evaluation, products and grid each run this many times, "
        "interleaved; the fastest run of each counts (default: 3 at --scale cpu, else 1)",
    )
    parser.add_argument("--skip-baseline", action="store_true", help="engine only")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write every number here")
    args = parser.parse_args(argv)

    preset = SCALES.get(args.scale, SCALES["cpu"])
    for name in ["queries", "classes", "templates", "anchors", "dim"]:
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    if args.prompts is not None:
        if args.prompts % args.classes:
            parser.error(f"--prompts {args.prompts} is not a multiple of --classes {args.classes}")
        args.templates = args.prompts // args.classes
    if args.memory_budget_mb is None:
        args.memory_budget_mb = preset["budget_mb"]
    if args.repeats is None:
        args.repeats = 3 if args.scale == "cpu" else 1
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: must be at least 1")
    if args.ns:
        args.ns = sorted({int(n) for n in args.ns.split(",")})
    else:
        args.ns = [n for n in GRID_NS if n <= args.anchors] or [args.anchors]
    args.ks = sorted({int(k) for k in args.ks.split(",")})
    args.ps = sorted({float(p) for p in args.ps.split(",")})
    if max(args.ns) > args.anchors:
        parser.error(f"--ns goes up to {max(args.ns)} but only {args.anchors} anchors exist")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


# ----------------------------------------------------------------------------- data


def synthetic_problem(args: argparse.Namespace, device: torch.device) -> dict:
    """Unit-norm embeddings from a shared latent space: anchors, queries and prompts all mix a
    class centre with noise, through one random linear map per modality. The noise levels put
    top-1 at about 0.5-0.7 for 100 classes (k=800, n=20k): far from chance and from perfect, so
    that a wrong prediction would show."""
    g = torch.Generator(device=device).manual_seed(args.seed)  # on the device: fast at 1.6M
    latent = 64
    centres = torch.randn(args.classes, latent, generator=g, device=device)
    maps = {m: torch.randn(latent, args.dim, generator=g, device=device) for m in ("image", "text")}

    def embed(classes: torch.Tensor, modality: str, noise: float) -> torch.Tensor:
        out = []
        for part in classes.split(200_000):  # bounded temporaries at paper scale
            z = centres[part] + noise * torch.randn(len(part), latent, generator=g, device=device)
            x = z @ maps[modality]
            x = x + 2.0 * torch.randn(x.shape, generator=g, device=device)  # modality noise
            out.append(unit_rows(x))
        return torch.cat(out)

    anchor_class = torch.randint(0, args.classes, (args.anchors,), generator=g, device=device)
    labels = torch.randint(0, args.classes, (args.queries,), generator=g, device=device)
    prompt_class = torch.arange(args.classes, device=device).repeat_interleave(args.templates)
    return dict(
        image_embeddings=embed(labels, "image", 2.0),
        anchor_image_embeddings=embed(anchor_class, "image", 2.0),
        prompt_embeddings=embed(prompt_class, "text", 1.0),
        anchor_text_embeddings=embed(anchor_class, "text", 2.0),
        labels=labels,
        prompt_class=prompt_class,
        num_classes=args.classes,
    )


# ----------------------------------------------------------------------------- measuring


class Measure:
    """Wall time and peak memory of a block. GPU: the allocator's peak above the start; CPU: the
    process RSS sampled every 2 ms, peak above the start (large tensors are mmapped, so their
    memory goes back to the system when freed and does not hide in the start value)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> Measure:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            import psutil

            process = psutil.Process()
            self.start_bytes = process.memory_info().rss
            self.peak_bytes, self._stop = self.start_bytes, threading.Event()

            def sample() -> None:
                while not self._stop.wait(0.002):
                    self.peak_bytes = max(self.peak_bytes, process.memory_info().rss)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.seconds = time.perf_counter() - self.start
            self.cpu_seconds = time.process_time() - self.cpu_start
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self.start_bytes) / 2**20
        else:
            self.seconds = time.perf_counter() - self.start
            self.cpu_seconds = time.process_time() - self.cpu_start
            self._stop.set()
            self._thread.join()
            self.peak_mb = (self.peak_bytes - self.start_bytes) / 2**20


def run_engine(problem: dict, ns, ks, ps, options: AsifOptions, device) -> tuple[dict, Measure]:
    with Measure(device) as measure:
        cells, timings = evaluate_grid(
            **problem, ns=ns, ks=ks, ps=ps, options=options, progress=False
        )
    measure.timings = timings
    measure.top1 = {(c.n, c.k, c.p): c.top1 for c in cells}
    return {(c.n, c.k, c.p): c.predictions for c in cells}, measure


def run_baseline(problem: dict, ns, k, ps, args, device) -> tuple[dict, Measure]:
    with Measure(device) as measure:
        predictions = zero_shot_classification(
            problem["image_embeddings"],
            problem["prompt_embeddings"],
            problem["anchor_image_embeddings"],
            problem["anchor_text_embeddings"],
            k=k,
            ns=ns,
            ps=ps,
            templates=args.templates,
            dic_size=args.dic_size,
            max_gpu_mem_gb=args.baseline_gb,
        )
    return {(n, k, p): pred for (n, p), pred in predictions.items()}, measure


def similarity_products(problem: dict, n: int, options: AsifOptions) -> None:
    """Every similarity the engine's top-k pass computes at this n, and nothing else."""
    device = options.resolved_device()
    dtype = options.resolved_dtype(device)
    sides = [
        (problem["image_embeddings"], problem["anchor_image_embeddings"]),
        (problem["prompt_embeddings"], problem["anchor_text_embeddings"]),
    ]
    for queries, anchors in sides:
        queries, anchors = queries.to(device, dtype), anchors[:n].to(device, dtype)
        width = max(1, min(n, tile_elements(device, options.budget_elements) // len(queries)))
        for start in range(0, n, width):
            similarities(queries, anchors[start : start + width])


def memory_scaling(args: argparse.Namespace, device: torch.device, options: AsifOptions) -> list:
    """Peak memory of the streaming top-k pass (k_max = --k) against n, on synthetic unit-norm
    anchors already in memory: what the pass itself allocates must not grow with n."""
    ns = sorted(int(n) for n in args.memory_scaling.split(","))
    g = torch.Generator(device=device).manual_seed(args.seed)
    queries = unit_rows(torch.randn(args.memory_queries, args.dim, generator=g, device=device))
    anchors = torch.empty(ns[-1], args.dim, device=device)
    for start in range(0, ns[-1], 100_000):  # bounded temporaries
        block = anchors[start : start + 100_000]
        block.copy_(unit_rows(torch.randn(block.shape, generator=g, device=device)))
    rows = []
    for n in ns:
        with Measure(device) as measure:
            streaming_topk(queries, anchors, [n], args.k, options, progress=False)
        rows.append({"n": n, "peak_mb": measure.peak_mb, "seconds": measure.seconds})
        print(f"{n:>10} anchors: peak {measure.peak_mb:8.0f} MB, {measure.seconds:.1f}s")
    return rows


def agreement(engine: dict, baseline: dict) -> dict:
    """Per-cell fraction of images with the same predicted class, over the cells both ran."""
    shared = sorted(set(engine) & set(baseline))
    fractions = [float((engine[c].cpu() == baseline[c].cpu()).float().mean()) for c in shared]
    return {
        "cells": len(shared),
        "identical_cells": sum(f == 1.0 for f in fractions),
        "min_fraction": min(fractions) if fractions else None,
        "mean_fraction": sum(fractions) / len(fractions) if fractions else None,
    }


def fmt_s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f}s"


def fmt_x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.1f}x"


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    options = AsifOptions(
        **AUTHORS_OPTIONS,
        compute_dtype=args.dtype,
        memory_budget_mb=args.memory_budget_mb,
        device=str(device),
    )
    run_baselines = not args.skip_baseline
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    report: dict = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
        + (f", {gpu}" if gpu else ""),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "engine_dtype": str(options.resolved_dtype(device)),
    }
    print(f"# {report['date']}  {report['machine']}")
    if hasattr(os, "getloadavg"):  # shared machines: other work inflates wall times
        report["load_average_start"] = os.getloadavg()[0]
        print(f"# load average at start: {report['load_average_start']:.1f}")
    print(
        f"# {args.queries} queries, {args.classes} classes x {args.templates} templates, "
        f"{args.anchors} anchors, d={args.dim}, device={device}, "
        f"engine dtype={report['engine_dtype']}, budget={args.memory_budget_mb:g} MB"
    )
    if args.memory_scaling:
        print(
            f"# memory of the streaming top-k pass: {args.memory_queries} queries, k={args.k}, "
            f"d={args.dim}, budget {args.memory_budget_mb:g} MB, anchors already in memory"
        )
        report["memory_scaling"] = memory_scaling(args, device, options)
        peaks = [row["peak_mb"] for row in report["memory_scaling"]]
        print(f"  peak at the largest n / at the smallest: {peaks[-1] / max(peaks[0], 1):.2f}x")
        write_json(args, report)
        return report
    start = time.perf_counter()
    problem = synthetic_problem(args, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    print(f"# data generated in {time.perf_counter() - start:.1f}s")

    # Warm-up (kernels, thread pools, MKL) on a small slice, not timed.
    small = min(args.ns[0], 2 * max(args.ks))
    small_k = min(args.ks[0], small)
    run_engine(problem, [small], [small_k], [args.ps[0]], options, device)
    if run_baselines:
        run_baseline(problem, [small], small_k, [args.ps[0]], args, device)

    n_max, k, p = max(args.ns), args.k, args.p
    # 1. one evaluation at the largest n, and the floor: its similarity products alone (both
    # sides, the engine's tile shapes and dtype, each tile written and dropped). On a shared
    # machine other work slows some runs: each is repeated, interleaved, and the fastest counts.
    engine_runs, product_runs = [], []
    for _ in range(args.repeats):
        engine_runs.append(run_engine(problem, [n_max], [k], [p], options, device))
        with Measure(device) as measure:
            similarity_products(problem, n_max, options)
        product_runs.append(measure)
    single_engine, measure = min(engine_runs, key=lambda run: run[1].seconds)
    single = {"n": n_max, "k": k, "p": p, "repeats": args.repeats, **engine_numbers(measure)}
    single["engine_top1"] = measure.top1[(n_max, k, p)]
    if run_baselines:
        single_baseline, measure = run_baseline(problem, [n_max], k, [p], args, device)
        single.update(
            baseline_s=measure.seconds,
            baseline_cpu_s=measure.cpu_seconds,
            baseline_peak_mb=measure.peak_mb,
            agreement=agreement(single_engine, single_baseline),
        )
    measure = min(product_runs, key=lambda run: run.seconds)
    single.update(products_s=measure.seconds, products_cpu_s=measure.cpu_seconds)
    report["single"] = single

    # 2. the whole grid (the fastest top-k pass and the fastest scoring of the repeats)
    grid_runs = [
        run_engine(problem, args.ns, args.ks, args.ps, options, device) for _ in range(args.repeats)
    ]
    grid_engine, measure = min(grid_runs, key=lambda run: run[1].seconds)
    grid = {"cells": len(grid_engine), "repeats": args.repeats, **engine_numbers(measure)}
    for part in ("topk_s", "scoring_s"):
        grid[f"engine_{part}"] = min(run[1].timings[part] for run in grid_runs)
    if run_baselines and args.baseline_grid != "skip":
        k_max = max(args.ks)
        measured_ks = args.ks if args.baseline_grid == "measure" else [k_max]
        baseline_predictions, wall, cpu, peak = {}, {}, {}, 0.0
        for baseline_k in measured_ks:
            for n in args.ns:  # the authors' algorithm treats every n on its own
                if baseline_k <= n:
                    predictions, measure = run_baseline(
                        problem, [n], baseline_k, args.ps, args, device
                    )
                    baseline_predictions.update(predictions)
                    wall[(n, baseline_k)], cpu[(n, baseline_k)] = (
                        measure.seconds,
                        measure.cpu_seconds,
                    )
                    peak = max(peak, measure.peak_mb)
        if args.baseline_grid == "measure":
            label = "measured"
        else:  # another k costs at most what k_max costs (the same einsums, a smaller topk)
            label = f"extrapolated: k={k_max} measured ({sum(wall.values()):.1f}s), x number of k"
            for times in (wall, cpu):
                for n in args.ns:
                    for other in args.ks:
                        if other != k_max and other <= n and (n, k_max) in times:
                            times[(n, other)] = times[(n, k_max)]
        grid.update(
            baseline_s=sum(wall.values()),
            baseline_cpu_s=sum(cpu.values()),
            baseline_label=label,
            baseline_peak_mb=peak,
            agreement=agreement(grid_engine, baseline_predictions),
        )
    report["grid"] = grid
    for part in (single, grid):
        if "baseline_s" in part:
            part["ratio"] = part["baseline_s"] / part["engine_s"]
            part["cpu_ratio"] = part["baseline_cpu_s"] / part["engine_cpu_s"]

    # 3. time against n: one evaluation (k, p) at each n, both implementations
    scaling = []
    if not args.no_scaling:
        for n in args.ns:
            if k > n:
                continue
            row = {"n": n}
            if n == n_max:  # measured above
                row.update(
                    {key: single.get(key) for key in ("engine_s", "engine_topk_s", "baseline_s")}
                )
            else:
                _, measure = run_engine(problem, [n], [k], [p], options, device)
                row.update(engine_s=measure.seconds, engine_topk_s=measure.timings["topk_s"])
                if run_baselines:
                    row["baseline_s"] = run_baseline(problem, [n], k, [p], args, device)[1].seconds
            scaling.append(row)
    # 12M anchors: the top-k pass is linear in n and scoring does not grow with n (fewer shared
    # anchors per pair), so scale the top-k part only; the baseline is linear in n throughout.
    factor = 12_000_000 / n_max
    report["estimate_12M_engine_s"] = single["engine_topk_s"] * factor + single["engine_scoring_s"]
    if "baseline_s" in single:
        report["estimate_12M_baseline_s"] = single["baseline_s"] * factor
    report["scaling"] = scaling

    single["eval_over_products"] = single["engine_s"] / single["products_s"]
    grid["scoring_over_topk"] = grid["engine_scoring_s"] / grid["engine_topk_s"]
    print_report(report, args)
    write_json(args, report)
    return report


def write_json(args: argparse.Namespace, report: dict) -> None:
    if args.json:  # atomically: a reader never sees half a report
        args.json.parent.mkdir(parents=True, exist_ok=True)
        partial = args.json.with_name(args.json.name + ".partial")
        partial.write_text(json.dumps(report, indent=2, default=str))
        partial.replace(args.json)


def engine_numbers(measure: Measure) -> dict:
    return {
        "engine_s": measure.seconds,
        "engine_cpu_s": measure.cpu_seconds,
        "engine_topk_s": measure.timings["topk_s"],
        "engine_scoring_s": measure.timings["scoring_s"],
        "engine_peak_mb": measure.peak_mb,
    }


def print_report(report: dict, args: argparse.Namespace) -> None:
    single, grid = report["single"], report["grid"]
    print(f"\n{'':<30} {'engine':>8} {'baseline':>9} {'ratio':>6} {'MB engine':>10} {'MB base':>8}")
    rows = [
        (f"single eval n={single['n']} k={single['k']} p={single['p']:g}", single),
        (f"whole grid ({grid['cells']} cells)", grid),
    ]
    for label, part in rows:
        print(
            f"{label:<30} {fmt_s(part['engine_s']):>8} {fmt_s(part.get('baseline_s')):>9} "
            f"{fmt_x(part.get('ratio')):>6} {part['engine_peak_mb']:>10.0f} "
            f"{part.get('baseline_peak_mb', float('nan')):>8.0f}"
        )
        print(
            f"{'  (process CPU time)':<30} {fmt_s(part['engine_cpu_s']):>8} "
            f"{fmt_s(part.get('baseline_cpu_s')):>9} {fmt_x(part.get('cpu_ratio')):>6}"
        )
    for label, part in rows:
        print(
            f"  engine {label.split(' (')[0]}: top-k {part['engine_topk_s']:.2f}s + "
            f"scoring {part['engine_scoring_s']:.2f}s"
        )
    if args.repeats > 1:
        print(f"  engine and products: the fastest of {args.repeats} interleaved runs")
    print(
        f"  single eval / products only: {single['eval_over_products']:.2f}x "
        f"(products {single['products_s']:.2f}s; CPU time "
        f"{single['engine_cpu_s'] / single['products_cpu_s']:.2f}x)"
    )
    print(
        f"  grid scoring / grid top-k: {grid['scoring_over_topk']:.2f}x "
        f"({grid['engine_scoring_s']:.2f}s / {grid['engine_topk_s']:.2f}s)"
    )
    if "baseline_label" in grid:
        print(f"  baseline grid: {grid['baseline_label']}")
    for label, part in rows:
        if "agreement" in part:
            a = part["agreement"]
            print(
                f"  agreement, {label}: {a['identical_cells']}/{a['cells']} cells identical, "
                f"min fraction of equal predictions {a['min_fraction']:.6f}"
            )
    print(
        f"  engine top-1 at the single evaluation: {single['engine_top1']:.4f} "
        f"(chance {1 / args.classes:.4f})"
    )
    if report["scaling"]:
        print(f"\n{'n':>10} {'engine':>8} {'(top-k)':>8} {'baseline':>9}  k={args.k} p={args.p:g}")
        for row in report["scaling"]:
            print(
                f"{row['n']:>10} {fmt_s(row['engine_s']):>8} {fmt_s(row['engine_topk_s']):>8} "
                f"{fmt_s(row.get('baseline_s')):>9}"
            )
    print(
        f"  12M anchors (estimate, not measured: top-k scaled linearly from n={single['n']}): "
        f"engine {report['estimate_12M_engine_s']:.1f}s, baseline "
        f"{fmt_s(report.get('estimate_12M_baseline_s'))}"
    )


if __name__ == "__main__":
    main()
