"""Pairs every weight with the matrix of its inputs and measures st(A), nr(G) and their ratio per step.

`Monitor` is the entry point; `diagnose` trains a model for a few steps with one and returns the verdicts.
"""

from specscope.probe.diagnose import DiagnoseResult, diagnose
from specscope.probe.monitor import Monitor, is_log_step
from specscope.probe.pairing import input_matrix

__all__ = ["Monitor", "diagnose", "DiagnoseResult", "input_matrix", "is_log_step"]
