"""The embedded problem: what every method and task works on, with no encoder or file in sight."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass
class Targets:
    """The benchmark's texts that images are scored against.

    Classification: class prompts, grouped by class (`groups[i]` is prompt i's class); a method
    scores each group (mean representation or best prompt, as it is configured). Retrieval:
    captions, `groups` None, each text its own target.
    """

    texts: list[str]
    embeddings: Tensor  # (texts, d_text)
    groups: Tensor | None = None  # (texts,) int64 group of each text
    group_names: list[str] | None = None

    @property
    def count(self) -> int:
        """Columns of a score matrix: groups when texts are grouped, else texts."""
        return len(self.texts) if self.group_names is None else len(self.group_names)


@dataclass
class EmbeddedProblem:
    """Anchors, benchmark and ground truth, embedded. Anchor rows are the readable pairs in
    dataset order, so that `n` anchors are always the same prefix."""

    anchor_images: Tensor  # (pairs, d_image)
    anchor_texts: Tensor  # (pairs, d_text)
    images: Tensor  # (benchmark images, d_image), the readable ones in dataset order
    targets: Targets
    truth: Any  # the task's ground truth: class labels (images,), or caption -> image ids
    cache_keys: tuple[str, ...] = ()  # identities of every embedding used, in order
    # Each anchor row's position among the listed pairs (failed downloads and unreadable images
    # leave gaps): asif.n counts listed pairs. None: no gaps.
    anchor_positions: list[int] | None = None
    # Each image row's index in the benchmark (unreadable images leave gaps), and each target
    # row's index among the benchmark's captions (None: class prompts). For explain's queries.
    image_positions: list[int] | None = None
    target_positions: list[int] | None = None
    info: dict = field(default_factory=dict)  # names, counts, skipped images (for results)
