"""What only a memory-based model can do: explain, edit, abstain, count anchor usage, save/load.

An ASIF model is nothing but its anchor pairs (embedded by two frozen encoders) plus k, p and
the options. So a prediction can be traced to the anchor pairs behind it, pairs can be removed
or added without retraining, and a query that shares no anchor with any prompt can say
"unknown". Everything here works on embeddings (from the cache). One module per job:

  model.py        the model artifact and editing (AsifModel, save/load)
  usage.py        anchor usage, pruning, abstention and the accuracy-coverage curve
  explanation.py  the anchor pairs behind one prediction (a class, or a retrieval match)
  figures.py      their figures and CSV tables (matplotlib: imported only by who draws)
  workspace.py    the explain job's model and embedded problem, built by the run's own code
  job.py          the explain job for any task (the command line `asif_exp.explain` calls it;
                  these two are not imported here: they load the pipeline)
"""

from asif_exp.memory.explanation import (
    Candidate,
    ClassExplanation,
    Contribution,
    Explanation,
    MatchExplanation,
    PairContribution,
    RetrievalExplanation,
    explain,
    explain_match,
)
from asif_exp.memory.model import (
    MODEL_FORMAT,
    MODEL_FORMAT_VERSION,
    MODEL_META,
    MODEL_PAIRS,
    MODEL_TENSORS,
    AsifModel,
    Prompts,
    load_model,
    save_model,
)
from asif_exp.memory.usage import (
    UNKNOWN,
    AnchorUsage,
    abstain,
    anchor_usage,
    coverage_curve,
    coverage_rows,
    explanation_counts,
    no_overlap,
    prune_unused,
    topk_counts,
    usage_summary,
)

__all__ = [
    "MODEL_FORMAT",
    "MODEL_FORMAT_VERSION",
    "MODEL_META",
    "MODEL_PAIRS",
    "MODEL_TENSORS",
    "UNKNOWN",
    "AnchorUsage",
    "AsifModel",
    "Candidate",
    "ClassExplanation",
    "Contribution",
    "Explanation",
    "MatchExplanation",
    "PairContribution",
    "Prompts",
    "RetrievalExplanation",
    "abstain",
    "anchor_usage",
    "coverage_curve",
    "coverage_rows",
    "explain",
    "explain_match",
    "explanation_counts",
    "load_model",
    "no_overlap",
    "prune_unused",
    "save_model",
    "topk_counts",
    "usage_summary",
]
