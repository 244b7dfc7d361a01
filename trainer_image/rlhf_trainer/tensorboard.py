"""A progress sink that writes every reported metric as a TensorBoard scalar.

Event files go to `<artifact>/tensorboard/` (docs/CONTRACTS.md §3), one run per stage, so
`tensorboard --logdir <storage>/<job>` shows every stage of a job side by side. Writer-side only:
torch's `SummaryWriter` (which needs the `tensorboard` package of the trainer extra).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlhf_trainer.progress import ProgressReport

TENSORBOARD_DIR = "tensorboard"
FLUSH_SECS = 10


def tensorboard_dir(artifact_dir: str | os.PathLike[str]) -> Path:
    """Where a stage whose artifact lives at local path `artifact_dir` writes event files."""
    return Path(artifact_dir) / TENSORBOARD_DIR


class TensorBoardSink:
    """Logs each report's metrics as scalars `<stage>/<metric>` at the report's step.

    Every update is written (`min_interval_s = 0`): curves need every step and the writer
    buffers in memory, flushing every `FLUSH_SECS` and on `close()`. The writer is created on
    the first report, so a stage that never reports leaves no empty run behind.
    """

    min_interval_s = 0.0

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        self.log_dir = Path(log_dir)
        self._writer: Any = None

    @classmethod
    def for_artifact(cls, artifact_dir: str | os.PathLike[str]) -> TensorBoardSink:
        """A sink writing under `<artifact_dir>/tensorboard/`."""
        return cls(tensorboard_dir(artifact_dir))

    def report(self, report: ProgressReport) -> None:
        writer = self._get_writer()
        for name, value in report.metrics.items():
            writer.add_scalar(f"{report.stage}/{name}", value, global_step=report.step)
        if report.final:
            writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def describe_failure(self, exc: BaseException) -> str:
        if isinstance(exc, ImportError):
            return (
                "TensorBoard logging disabled: the `tensorboard` package is not installed "
                "(pip install 'rlhf-operator[trainer]')"
            )
        return f"TensorBoard logging to {self.log_dir} disabled: {type(exc).__name__}: {exc}"

    def _get_writer(self) -> Any:
        if self._writer is None:
            # Raises ImportError without the `tensorboard` package: the reporter then disables
            # this sink with the message above.
            from torch.utils.tensorboard import SummaryWriter

            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=FLUSH_SECS)
        return self._writer
