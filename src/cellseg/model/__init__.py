"""Model: the experiment config, the Mask R-CNN builder, checkpoints, weights manifests and export."""
