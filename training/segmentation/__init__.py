"""Segmentation (U-Net): data, augmentation, losses, metrics, training, evaluation, baselines, dental phantoms."""
