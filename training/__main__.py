"""`python -m training ...` (and `torchrun -m training ...`) is the same as the `medserve` command."""

from training.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
