"""Reports: matplotlib figures of a run's metrics and one self-contained HTML page per run or comparison.

Input is data, not files: the store's long-format metrics DataFrame, a config dict and the lab's claims.
The pages embed every figure as a PNG data URI, load nothing from the network, contain no script and
escape every string they did not write themselves.
"""

from specscope.report.compare import compare_final_ranks, compare_losses, final_ranks, write_comparison
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
from specscope.report.tables import claims_table, layer_summary, layer_table, rank_pairs

__all__ = [
    "accuracy_curves", "advantage_heatmap", "claims_figure", "claims_table", "compare_final_ranks",
    "compare_losses", "final_ranks", "layer_summary", "layer_table", "loss_curves", "nuclear_rank_curves",
    "rank_curves", "rank_pairs", "rank_scatter", "run_figures", "stable_rank_curves", "write_comparison",
    "write_report",
]
