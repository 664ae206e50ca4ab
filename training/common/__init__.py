"""What segmentation and classification training share: options, seeding, threads, the learning-rate schedule,
mixed precision, the training step, resume state, run files, the result record and plots."""
