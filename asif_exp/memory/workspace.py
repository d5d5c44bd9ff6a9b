"""The explain job's workspace: a model and the problem a run would score, embedded by the run's
own code (`pipeline.embed_problem`; with `model_dir`, the saved model's anchors and
`pipeline.embed_benchmark`), with the benchmark's indices and names of every row."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property

from omegaconf import DictConfig
from PIL import Image

from asif_exp.data import (
    AnchorSet,
    Benchmark,
    CaptionedBenchmark,
    load_anchors,
    load_benchmark,
)
from asif_exp.errors import ConfigError, DataError
from asif_exp.memory.model import AsifModel, Prompts, load_model
from asif_exp.methods.asif import asif_options, grid_values
from asif_exp.options import single
from asif_exp.pipeline import (
    Embedder,
    check_task_fits_benchmark,
    embed_benchmark,
    embed_problem,
    encoder_identities,
    readable_prefixes,
)
from asif_exp.problem import EmbeddedProblem
from asif_exp.tasks.base import Task


@dataclass
class Workspace:
    """A model and the problem a run would score, embedded (from the cache when it can)."""

    model: AsifModel
    task: Task
    problem: EmbeddedProblem  # images, targets and truth; anchors: the model's source
    benchmark: Benchmark | CaptionedBenchmark
    anchors: AnchorSet | None  # None for a model loaded from model_dir
    from_cache: dict[str, bool]

    @cached_property
    def prompts(self) -> Prompts:
        return Prompts.of_targets(self.problem.targets)

    @property
    def kept(self) -> list[int]:
        """Benchmark index of each embedded image (unreadable ones are skipped)."""
        return self.problem.image_positions

    def index_of(self, kind: str, row: int) -> int:
        """Benchmark index of embedded row `row` of an image, a caption or a class."""
        if kind == "image":
            return self.kept[row]
        if kind == "text" and self.problem.target_positions is not None:
            return self.problem.target_positions[row]
        return row

    def names(self, kind: str) -> list[str]:
        """Names of the embedded rows of a kind: image ids, captions or class names."""
        if kind == "image":
            return [self.benchmark.images.ids[i] for i in self.kept]
        return list(self.prompts.class_names) if kind == "class" else self.problem.targets.texts

    def row_of(self, kind: str, query: int) -> int:
        """Embedded row of benchmark image (or caption) `query`; a clear error if it has none."""
        name = self.benchmark.name
        if kind == "image":
            count = len(self.benchmark.images)
            if not 0 <= query < count:
                raise ConfigError(f"query={query}: benchmark {name} has images 0..{count - 1}")
            if query not in self._image_rows:
                raise DataError(
                    f"query={query}: image {self.benchmark.images.ids[query]!r} was skipped "
                    "as unreadable"
                )
            return self._image_rows[query]
        count = len(self.benchmark.captions)
        if not 0 <= query < count:
            raise ConfigError(f"query={query}: benchmark {name} has captions 0..{count - 1}")
        if query not in self._caption_rows:
            image = self.benchmark.images.ids[self.benchmark.caption_image[query]]
            raise DataError(
                f"query={query}: the caption's image {image!r} was skipped as unreadable"
            )
        return self._caption_rows[query]

    @cached_property
    def _image_rows(self) -> dict[int, int]:
        return {index: row for row, index in enumerate(self.kept)}

    @cached_property
    def _caption_rows(self) -> dict[int, int]:
        return {index: row for row, index in enumerate(self.problem.target_positions or [])}

    @cached_property
    def _anchor_position(self) -> dict[str, int]:
        return {image_id: i for i, image_id in enumerate(self.anchors.images.ids)}

    def anchor_image(self, anchor_id: str) -> Image.Image | None:
        """The anchor's image, or None when only its embedding is known (a loaded model)."""
        if self.anchors is None:
            return None
        return self.anchors.images.load(self._anchor_position[anchor_id])


def _encoders(cfg: DictConfig) -> dict:
    # as a saved model holds them (tuples as lists)
    return json.loads(json.dumps(encoder_identities(cfg)))


def load_workspace(cfg: DictConfig, task: Task) -> Workspace:
    """The model (from `anchors` and `asif`, or `model_dir`) and the embedded benchmark, by the
    run's own code; every config mistake fails before anything is encoded."""
    embedder = Embedder(cfg)
    anchors = model = None
    if cfg.model_dir:
        model = load_model(cfg.model_dir, device=cfg.device)
        if model.encoders != _encoders(cfg):
            raise ConfigError(
                f"model_dir={cfg.model_dir} was built with encoders {model.encoders}, but the "
                f"config's are {_encoders(cfg)}: its anchors and these queries are not comparable"
            )
    else:
        anchors = load_anchors(cfg.anchors, cfg.paths.data_root)
        ns, ks, ps = grid_values(cfg, len(anchors.captions))
        k, p = single("asif.k", ks), single("asif.p", ps)
        n = None if cfg.asif.n is None else single("asif.n", ns)
    benchmark = load_benchmark(cfg.benchmark, cfg.paths.data_root)
    check_task_fits_benchmark(task, benchmark)
    if model is not None:
        bench = embed_benchmark(embedder, benchmark)
        problem = EmbeddedProblem(
            model.anchor_image_embeddings,
            model.anchor_text_embeddings,
            bench.images,
            bench.targets,
            bench.truth,
            image_positions=bench.kept,
            target_positions=bench.target_positions,
        )
    else:
        problem = embed_problem(cfg, embedder, anchors, benchmark)
        kept = problem.anchor_positions
        # n counts listed pairs (as in a run): the readable ones among the first n are used
        n = len(kept) if n is None else readable_prefixes([n], kept)[n]
        model = AsifModel(
            problem.anchor_images[:n],
            problem.anchor_texts[:n],
            [anchors.images.ids[i] for i in kept[:n]],
            [anchors.captions[i] for i in kept[:n]],
            k,
            p,
            asif_options(cfg),
            _encoders(cfg),
        )
    return Workspace(model, task, problem, benchmark, anchors, embedder.cached)
