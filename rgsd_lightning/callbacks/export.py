"""Export the artifact a stage hands to the next one (DESIGN §3), at the end of training.

Stage modules implement ``export(directory) -> Path`` and name their artifact in ``export_name``
("generator" for ColdStartDiT / RewardDPOK, "backbone" for the recognizers). This callback calls it on
rank 0 when fitting ends, into ``<dirpath>`` or ``<log_dir>/export/<export_name>``, and every rank waits
for it (a save on one rank with the others racing ahead is the classic DDP hang).
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import Callback

from rgsd_lightning.io import run_dir


class ExportArtifact(Callback):
    """Call ``pl_module.export`` when fitting ends.

    Args:
        dirpath: where to write the artifact; default ``<log_dir>/export/<module.export_name>``.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self.last_path: Path | None = None

    def target(self, trainer, pl_module) -> Path:
        """The folder the artifact goes to."""
        if self.dirpath is not None:
            return Path(self.dirpath)
        return run_dir(trainer) / "export" / pl_module.export_name

    def on_fit_end(self, trainer, pl_module) -> None:
        path = self.target(trainer, pl_module)
        if trainer.is_global_zero:
            self.last_path = pl_module.export(path)
        trainer.strategy.barrier("export_artifact")
        self.last_path = path
