"""The ASIF engine: sparse relative representations and zero-shot scoring over a (n, k, p) grid.

One streaming pass over the anchors, in prefix order, keeps a running top-k_max of every
query's (and every prompt's) similarities and snapshots it at each n of the grid. Every
(n, k, p) cell reuses that pass: a smaller k is a prefix of the sorted top-k_max, and every
p powers the same values. Scores are sparse-sparse products, or, where a cell is dense enough
for a GEMM to be cheaper, dense products over blocks that fit the memory budget; never a whole
dense queries x n matrix. CPU and GPU run the same code; on a GPU everything stays on the device
and only metrics and predictions come back.

One module per stage, in the order a run goes through them:
- `options`: `AsifOptions`, the named presets (clean, authors, ...), grid checks;
- `topk`: the streaming top-k pass and its candidate pool, `select_topk`, the multirun memo;
- `layouts`: top-k snapshots as CSR layouts, CSR helpers, the dense-or-sparse cost model;
- `scoring`: representations -> scores (`score_targets`), a grid cell's scores (`cell_scores`);
- `grid`: `score_grid`, every cell of a (n, k, p) grid from one pass;
- `method`: `AsifMethod` and `build` (the pipeline's method), one model's scores for `memory/`;
- `cpu_kernels`: the numba loops the CPU path compiles.
"""

import warnings

# torch warns on every sparse CSR use that the API is beta and unchecked; the engine builds its
# CSR tensors itself (sorted, in range), and the repeated warnings would bury the run's output.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")

from asif_exp.methods.asif.grid import check_problem, score_grid  # noqa: E402
from asif_exp.methods.asif.layouts import class_representation, relative_representation  # noqa: E402
from asif_exp.methods.asif.method import (  # noqa: E402
    AsifMethod,
    ModelScores,
    build,
    grid_values,
    model_scores,
    topk_memo_for,
)
from asif_exp.methods.asif.options import (  # noqa: E402
    AUTHORS_OPTIONS,
    AUTHORS_UNCLAMPED_OPTIONS,
    CLEAN_OPTIONS,
    FUNCTIONS,
    AsifOptions,
    asif_options,
    check_grid,
    function_of,
)
from asif_exp.methods.asif.scoring import (  # noqa: E402
    class_scores,
    image_representations,
    prompt_representations_t,
    score_targets,
    sparse_scores,
)
from asif_exp.methods.asif.topk import TopK, select_topk, streaming_topk  # noqa: E402

__all__ = [
    "AUTHORS_OPTIONS",
    "AUTHORS_UNCLAMPED_OPTIONS",
    "CLEAN_OPTIONS",
    "FUNCTIONS",
    "AsifMethod",
    "AsifOptions",
    "ModelScores",
    "TopK",
    "asif_options",
    "build",
    "check_problem",
    "check_grid",
    "class_representation",
    "class_scores",
    "function_of",
    "grid_values",
    "image_representations",
    "model_scores",
    "prompt_representations_t",
    "relative_representation",
    "score_grid",
    "score_targets",
    "select_topk",
    "sparse_scores",
    "streaming_topk",
    "topk_memo_for",
]
