"""A run's scalars for TensorBoard, written only when the tensorboard package is installed.

Training writes ``RUN_DIR/tensorboard/events.out.tfevents.*``:

* after every epoch, the numbers of that epoch's metrics.jsonl record
  (``EPOCH_KEYS``) under ``epoch/<key>``, e.g. ``epoch/test_acc`` (a fraction,
  as in metrics.jsonl);
* every ``step_every`` optimizer steps, the loss of that step's batch and the
  learning rate under ``step/loss`` and ``step/lr``. The training loop reads its
  running values from the device at the same interval (see ``train.py``), so
  logging costs no extra wait for the device.

The x value of every scalar is the optimizer step (an epoch's numbers sit at
the step that ended it), so the two groups share one axis. View them with
``tensorboard --logdir runs``.

TensorBoard is optional (``pip install 'vitcraft[tensorboard]'``): without it
``TensorBoardLog`` is a no-op, so the training loop calls it unconditionally.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

TENSORBOARD_DIR = "tensorboard"  # inside the run directory
EVENT_FILE_PREFIX = "events.out.tfevents."  # how TensorBoard names its event files
EPOCH_KEYS = ("train_loss", "train_acc", "test_loss", "test_acc", "test_top5", "lr", "images_per_second")


class TensorBoardLog:
    """Scalar logging into ``run_dir/tensorboard``; every method does nothing when disabled.

    It is disabled when ``enabled`` is False (``--no-tensorboard``, or a rank
    other than 0) or when ``torch.utils.tensorboard`` cannot be imported
    because the tensorboard package is missing.
    ``resume_step``: the step of the checkpoint a resumed run starts from.
    Scalars the stopped run logged after that step are hidden (TensorBoard's
    ``purge_step``), so the resumed run's values replace them instead of
    being drawn twice.
    """

    step_every = 10  # log the batch loss and lr every this many optimizer steps (the loop reads them then)

    def __init__(self, run_dir: Path | str, enabled: bool = True, resume_step: int = 0):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # the optional extra is not installed
            return
        # purge_step hides events at steps >= it; the checkpoint's own step stays
        self.writer = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR),
                                    purge_step=resume_step + 1 if resume_step else None)

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def log_step(self, step: int, loss: float, lr: float) -> None:
        """Record one optimizer step (``step`` counted from 1) if it is a multiple of ``step_every``."""
        if self.writer is None or step % self.step_every:
            return
        self.writer.add_scalar("step/loss", loss, step)
        self.writer.add_scalar("step/lr", lr, step)

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        """Record an epoch's metrics.jsonl record (needs its ``step``) and flush to disk."""
        if self.writer is None:
            return
        for key in EPOCH_KEYS:
            if record.get(key) is not None:
                self.writer.add_scalar(f"epoch/{key}", record[key], record["step"])
        self.writer.flush()  # a run stopped later still has every finished epoch on disk

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def remove_event_files(run_dir: Path | str) -> None:
    """Delete the event files in ``run_dir/tensorboard``, then the folder if nothing else is in it.

    Used by ``--overwrite``: any other file a user put in that folder stays.
    """
    folder = Path(run_dir) / TENSORBOARD_DIR
    if not folder.is_dir():
        return
    for path in folder.glob(EVENT_FILE_PREFIX + "*"):
        if path.is_file():
            path.unlink()
    if not any(folder.iterdir()):
        folder.rmdir()
