"""Model: the Mask R-CNN builder and its parts, training targets, half precision, checkpoints, provenance, export."""
