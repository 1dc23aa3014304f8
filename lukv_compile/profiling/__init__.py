"""Offline profiling: oracle future-utility recorder, per-head loss curves, and the profile runner."""

from lukv_compile.profiling.curves import cum_losses, eviction_order, layer_scores
from lukv_compile.profiling.oracle import OracleResult, PrefillRecord, oracle_importance, record_prefill
from lukv_compile.profiling.run import (
    Calibration,
    ProfileResult,
    calibration_inputs,
    head_graph,
    mean_fractions,
    min_keep,
    profile_model,
    profile_scorers,
    prune_fractions,
)

__all__ = [
    "Calibration",
    "OracleResult",
    "PrefillRecord",
    "ProfileResult",
    "calibration_inputs",
    "cum_losses",
    "eviction_order",
    "head_graph",
    "layer_scores",
    "mean_fractions",
    "min_keep",
    "oracle_importance",
    "profile_model",
    "profile_scorers",
    "prune_fractions",
    "record_prefill",
]
