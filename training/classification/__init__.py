"""Classification (transfer-learned CNN): data, augmentation, metrics, training, evaluation, baselines, lesion
phantoms."""
