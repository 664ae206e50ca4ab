"""Two CPU processes (gloo) train with DistributedDataParallel, as `torchrun --nproc_per_node 2` would run them."""

import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

from models.checkpoint import load_checkpoint
from training.segmentation.synthetic import generate_dental


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, argv: list[str], record_dir: str) -> None:
    # The environment torchrun sets for each process.
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    written: list[str] = []

    def audit(event: str, args: tuple) -> None:
        # Every file this process opens for writing or renames into place.
        if (event == "open" and isinstance(args[1], str) and any(c in args[1] for c in "wax+")) or (
            event == "open"
            and args[1] is None
            and isinstance(args[2], int)
            and args[2] & (os.O_WRONLY | os.O_RDWR)
        ):
            written.append(str(args[0]))
        elif event == "os.rename":
            written.append(str(args[1]))

    sys.addaudithook(audit)
    from training.cli import build_parser
    from training.segmentation.train import run

    result = run(build_parser(argv).parse_args(argv))
    state = {k: v.clone() for k, v in result.model.state_dict().items()}
    done = list(written)
    torch.save(state, Path(record_dir) / f"rank{rank}.weights")
    (Path(record_dir) / f"rank{rank}.json").write_text(json.dumps(done))


def test_two_process_training_agrees_and_only_rank0_writes(tmp_path):
    generate_dental(tmp_path / "data", 6, 48, seed=0)
    out_dir = tmp_path / "out"
    records = tmp_path / "records"
    records.mkdir()
    argv = ["train", "segment", "--data", str(tmp_path / "data"), "--out", str(out_dir / "m.pt")]
    argv += ["--epochs", "1", "--img-size", "32", "--channels", "4,8", "--batch-size", "2"]
    argv += ["--samples-per-epoch", "8", "--val-split", "0.34", "--device", "cpu"]
    mp.spawn(_worker, args=(2, _free_port(), argv, str(records)), nprocs=2, join=True)

    weights = [torch.load(records / f"rank{r}.weights", weights_only=True) for r in (0, 1)]
    meta, saved = load_checkpoint(out_dir / "m.pt")
    assert meta.training["world_size"] == 2
    # Parameters and BatchNorm statistics are identical on both ranks ...
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
    # ... and the checkpoint holds exactly those weights (one epoch: the best is the last).
    for name, tensor in saved.items():
        assert torch.equal(tensor, weights[0][name]), name
    history = json.loads((out_dir / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1]
    assert meta.metrics["dice"] == history[0]["val_dice"]  # validation results gathered from both ranks
    assert meta.training["val_images"] == 2

    writes = [json.loads((records / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert not [p for p in writes[1] if str(out_dir) in p], "rank 1 wrote into the output folder"
    assert any(p.endswith("m.pt") for p in writes[0]) and any(p.endswith("history.json") for p in writes[0])
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "history.json",
        "learning_curves.png",
        "m.pt",
        "m.train-state",
    ]
