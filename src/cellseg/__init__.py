"""sartorius-cellseg: Mask R-CNN training, exact local scoring and offline Kaggle submission for the
"Sartorius - Cell Instance Segmentation" competition.

Data flow: test PNG -> predict (models x TTA views) -> ensemble (fusion) -> postprocess (cell-type
vote, score threshold, fill holes, min pixels, overlap removal) -> RLE -> submission.csv.
"""

__version__ = "0.1.0"

#: Competition class ids (1-based, 0 is background) and their cell-type names.
CELL_TYPES: tuple[str, ...] = ("shsy5y", "astro", "cort")
CLASS_IDS: dict[str, int] = {name: i + 1 for i, name in enumerate(CELL_TYPES)}

#: Competition image size (height, width).
IMAGE_SHAPE: tuple[int, int] = (520, 704)
