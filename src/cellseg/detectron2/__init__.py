"""Detectron2: checkpoint conversion and Detectron2-faithful layers (no Detectron2 import)."""
