"""Run under ``torchrun`` by tests/test_distributed.py (not a test module): library-level DDP training.

``python -m torch.distributed.run --nproc-per-node 2 --standalone tests/ddp_worker.py MODE OUT``

- ``interrupted``: trains ``OUT/full`` for 3 epochs, then ``OUT/part`` with rank 0 killed after epoch 2;
- ``resume``: resumes ``OUT/part``;
- ``sharded``: every rank passes its own shard of the training set (``train_sharded=True``);
- ``store``: trains from a Zarr store of 20-row chunks and writes the chunks each rank read per epoch to
  ``OUT/chunks-RANK.json``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from specabund.models import default_config
from specabund.training import train
from specabund.training.distributed import env_context
from test_training import LABELS, make_synthetic, small_config


def env_barrier() -> None:
    """Wait for rank 0's files before the others read them (a file barrier: the process group is the
    trainer's)."""
    import time

    ctx = env_context()
    flag = Path(sys.argv[2]) / "train_dataset.zarr" / "zarr.json"
    while ctx.rank > 0 and not flag.exists():
        time.sleep(0.1)


class Killed(Exception):
    pass


def main(mode: str, out: Path) -> None:
    data = make_synthetic(n=240, missing_frac=0.1)
    tr, va = data.split_subset("train"), data.split_subset("val")
    mcfg = default_config("rescnn_small", dropout=0.1, head_dropout=0.1)  # exercise the per-rank RNG
    tcfg = small_config(epochs=3, batch_size=16)
    if mode == "interrupted":
        train(tr, va, LABELS, mcfg, tcfg, out / "full")

        def kill(epoch: int, row: dict) -> None:
            if epoch == 2:
                raise Killed(f"rank {env_context().rank} killed after epoch 2")

        train(tr, va, LABELS, mcfg, tcfg, out / "part", callbacks=[kill])
    elif mode == "resume":
        train(tr, va, LABELS, mcfg, tcfg, out / "part", resume=True)
    elif mode == "sharded":  # each rank passes its own, unequal, shard of the training set
        ctx = env_context()
        rows = np.arange(100) if ctx.rank == 0 else np.arange(100, len(tr))
        train(tr.subset(rows), va, LABELS, mcfg, small_config(epochs=2, batch_size=16), out / "sharded",
              train_sharded=True)  # fmt: skip
    elif mode == "store":
        import json

        from specabund.dataset import load_dataset, save_dataset
        from specabund.training import trainer

        ctx = env_context()
        path = out / "train_dataset.zarr"
        if ctx.rank == 0:
            save_dataset(path, tr, chunk_rows=20)
        env_barrier()
        store = load_dataset(path)
        seen: dict[int, list[int]] = {}
        original = trainer._epoch_batches

        def spy(setup: trainer._Setup, epoch: int) -> list:
            batches = original(setup, epoch)
            rows = np.concatenate([b.numpy() for b in batches])
            seen[epoch] = sorted({int(c) for c in setup.train_t.X.chunk_of_row[rows]})
            seen[f"steps{epoch}"] = len(batches)
            return batches

        trainer._epoch_batches = spy
        train(store, va, LABELS, mcfg, small_config(epochs=2, batch_size=16), out / "store")
        (out / f"chunks-{ctx.rank}.json").write_text(json.dumps(seen))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    main(sys.argv[1], Path(sys.argv[2]))
