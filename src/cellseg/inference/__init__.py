"""Inference: forward with TTA, cell-type vote, fusion, post-processing, the per-image pipeline and the folder runner."""
