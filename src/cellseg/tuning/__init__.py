"""Threshold tuning: the raw-detection cache (predict-raw), the grid search (tune) and its report."""
