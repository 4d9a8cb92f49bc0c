"""Pairs every weight with the matrix of its inputs and measures st(A), nr(G) and their ratio per step.

`Monitor` is the entry point; `diagnose` trains a model for a few steps with one and returns the verdicts;
`verdict`/`MARGIN` are the one rule every verdict in specscope uses.
"""

from specscope.probe.advice import MARGIN, VERDICTS, verdict
from specscope.probe.diagnose import DiagnoseResult, diagnose
from specscope.probe.monitor import Monitor, is_log_step
from specscope.probe.pairing import Interleaved, input_matrix

__all__ = ["Monitor", "diagnose", "DiagnoseResult", "input_matrix", "is_log_step", "Interleaved", "MARGIN", "VERDICTS", "verdict"]
