"""Data: Kaggle RLE, train.csv ground truth, folds, the synthetic generator, the torch dataset and augmentation."""
