"""One config system: the YAML loader and the typed schemas (experiment sections, weights manifest)."""
