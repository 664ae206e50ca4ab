"""What segmentation and classification training share, written once.

``options`` (``--img-size`` parsing, ``--device``, ``--intensity``, arguments as JSON), ``runtime`` (seeds, CPU
threads, progress bars), ``schedule`` (warm-up + cosine), ``precision`` (the mixed-precision policy), ``engine``
(the optimisation step), ``state`` (``--resume`` state), ``run`` (the result record, ``history.json`` and
learning curves, via ``plots``), ``checkpoints`` (finding a model folder's checkpoints) and ``distributed``
(torchrun process groups).
"""
