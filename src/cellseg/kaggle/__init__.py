"""Kaggle: the dataset bundle, metadata files and the fake-Kaggle demo tree."""
