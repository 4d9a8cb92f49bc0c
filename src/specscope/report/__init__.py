"""Reports: matplotlib figures of a run's metrics and one self-contained HTML page per run or comparison.

Input is data, not files: the store's long-format metrics DataFrame, a config dict and the lab's claims.
The pages embed every figure as a PNG data URI, load nothing from the network, run no script but their
own (sorting and searching the per-weight table, allowed by a Content-Security-Policy hash) and escape
every string they did not write themselves. `style` is the one figure style of the project; `browser`
checks a page in headless Chromium.
"""

from specscope.report.compare import compare_final_ranks, compare_losses, final_ranks, run_labels, write_comparison
from specscope.report.figures import (
    accuracy_curves,
    advantage_heatmap,
    claims_figure,
    loss_curves,
    nuclear_rank_curves,
    rank_curves,
    rank_scatter,
    run_figures,
    stable_rank_curves,
)
from specscope.report.html import write_report
from specscope.report.tables import claims_table, layer_summary, layer_table, rank_pairs, unmeasured

__all__ = [
    "accuracy_curves", "advantage_heatmap", "claims_figure", "claims_table", "compare_final_ranks",
    "compare_losses", "final_ranks", "layer_summary", "layer_table", "loss_curves", "nuclear_rank_curves",
    "rank_curves", "rank_pairs", "rank_scatter", "run_figures", "run_labels", "stable_rank_curves", "unmeasured",
    "write_comparison", "write_report",
]
