"""Training and evaluation for MedServe, and the `medserve` command line.

Layout: ``cli.py`` wires the subcommands; ``segmentation/`` and ``classification/`` hold each task's data,
augmentation, training (``train.py``: ``train_one_epoch`` / ``evaluate`` in ``engine.py``, ``main(args)``),
evaluation command, baselines, phantom generator and demo model; ``common/`` holds what both tasks use. The
task-independent commands (``export``, ``info``, ``synth``, ``demo``) are modules at the top level.
"""
