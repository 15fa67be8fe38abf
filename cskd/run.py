"""The run directory: the one owner of what ``cskd train`` writes and every later command reads.

```
RUN/config.yaml          the resolved configuration (rerun with --config)
RUN/metrics.jsonl        one JSON object per epoch
RUN/best.safetensors     deployable weights with their spec (best validation top-1)
RUN/last.safetensors     the same after the last finished epoch
RUN/last.state.pt        optimizer, scaler and EMA state for --resume (marks an epoch done)
RUN/curves.png           the curves of metrics.jsonl
RUN/pairing.json         distilled student runs: teacher and student cost, the teacher's validation top-1/top-5
```

``cskd eval``, ``cskd export`` and ``cskd bench`` find checkpoints, the teacher a student was
distilled from and the data it was trained on through :class:`RunDir`, never by reading files raw.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional

from cskd.assets import DEMO_REFERENCE, DEMO_TEACHER, DEMO_TEACHER_CACHE, asset_path
from cskd.checkpoint import BEST, LAST, checkpoint_epoch, resolve_checkpoint
from cskd.config import Config, DataConfig, load_config, save_config
from cskd.data.validation import TeacherAccuracy
from cskd.errors import CSKDError
from cskd.files import atomic_write, atomic_write_json, atomic_write_text


def resolve_teacher_reference(value: str) -> Path:
    """A ``teacher.checkpoint`` value as a path: ``demo`` is the packaged demo teacher."""
    return asset_path(DEMO_TEACHER) if value == DEMO_REFERENCE else Path(value)


def resolve_cache_reference(value: str) -> Path:
    """A ``teacher.cache`` value as a path: ``demo`` is the packaged cache of the demo teacher over
    the embedded training split."""
    return asset_path(DEMO_TEACHER_CACHE) if value == DEMO_REFERENCE else Path(value)


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    CONFIG = "config.yaml"
    METRICS = "metrics.jsonl"
    BEST = BEST
    LAST = LAST
    STATE = "last.state.pt"
    CURVES = "curves.png"
    PAIRING = "pairing.json"

    # -- where a run lives -------------------------------------------------------------------

    @staticmethod
    def default_path(target: str) -> Path:
        return Path("runs") / f"{target}-{datetime.now():%Y%m%d-%H%M%S}"

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        """An existing run directory (one with config.yaml)."""
        run = cls(Path(path))
        if not (run.path / cls.CONFIG).is_file():
            raise CSKDError(f"{run.path} is not a run directory (no {cls.CONFIG}); pass the output folder of `cskd train`")
        return run

    @classmethod
    def of_checkpoint(cls, checkpoint: Path) -> Optional["RunDir"]:
        """The run that wrote ``checkpoint`` (a file in it), or None for a checkpoint on its own."""
        parent = Path(checkpoint).parent
        return cls(parent) if (parent / cls.CONFIG).is_file() else None

    def prepare(self, resume: bool, create: bool = True) -> None:
        """Check the folder can start (or resume) a run; make it and check it is writable."""
        if not resume and self.has_state:
            raise CSKDError(f"{self.path} already holds a run; continue it with `cskd train --resume {self.path}` "
                            "or set output=ANOTHER_DIR")
        if resume and not self.has_state:
            raise CSKDError(f"{self.path} has no {self.STATE} to resume from (the run never finished an epoch); start it anew")
        if not create:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise CSKDError(f"cannot write to output folder {self.path} ({exc.strerror}); set output=A_WRITABLE_DIR") from None

    # -- configuration -----------------------------------------------------------------------

    def config(self, overrides: tuple = ()) -> Config:
        """The run's resolved configuration (plus ``overrides``), validated."""
        return load_config(self.path / self.CONFIG, overrides)

    def save_config(self, cfg: Config) -> None:
        save_config(cfg, self.path / self.CONFIG)

    def data_config(self) -> Optional[DataConfig]:
        return self.config().data if (self.path / self.CONFIG).is_file() else None

    # -- checkpoints -------------------------------------------------------------------------

    @property
    def best(self) -> Path:
        return self.path / self.BEST

    @property
    def last(self) -> Path:
        return self.path / self.LAST

    @property
    def state(self) -> Path:
        return self.path / self.STATE

    @property
    def has_state(self) -> bool:
        return self.state.exists()

    def checkpoint(self) -> Path:
        """``best.safetensors``, else ``last.safetensors``."""
        return resolve_checkpoint(self.path)

    def restore_best(self, epoch: int) -> bool:
        """Make ``best.safetensors`` hold ``epoch`` (1-based), the last finished one, by copying
        ``last.safetensors`` when it does not: a run stopped after the resume state called the epoch
        best but before its best weights were written. Returns whether it copied."""
        if checkpoint_epoch(self.best) == epoch:
            return False
        if checkpoint_epoch(self.last) != epoch:
            raise CSKDError(f"the resume state of {self.path} calls epoch {epoch} the best, but neither {self.BEST} nor "
                            f"{self.LAST} holds it; restore the run's files or start a new run")
        atomic_write(self.best, lambda tmp: shutil.copyfile(self.last, tmp))
        return True

    # -- metrics -----------------------------------------------------------------------------

    def append_metrics(self, record: Dict[str, Any]) -> None:
        with open(self.path / self.METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")

    def metrics(self, up_to_epoch: Optional[int] = None) -> List[Dict[str, Any]]:
        """The rows of metrics.jsonl, optionally only those of epochs 1..up_to_epoch. An unreadable
        last line is left out: a crash cut its append short."""
        path = self.path / self.METRICS
        if not path.exists():
            return []
        lines = [(number, line) for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
        rows = []
        for i, (number, line) in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if i == len(lines) - 1:
                    break  # the torn append of a crash
                raise CSKDError(f"{path} line {number} is not JSON: {line[:60]!r}; delete or mend that line and rerun") from None
        return [r for r in rows if up_to_epoch is None or r["epoch"] <= up_to_epoch]

    def truncate_metrics(self, completed_epochs: int) -> None:
        """Drop lines of epochs after the resumed checkpoint (a crash may have logged them) and a
        torn last line."""
        rows = self.metrics(completed_epochs)
        atomic_write_text(self.path / self.METRICS, "".join(json.dumps(r) + "\n" for r in rows))

    @property
    def curves(self) -> Path:
        return self.path / self.CURVES

    def save_pairing(self, report: Dict[str, Any]) -> None:
        atomic_write_json(self.path / self.PAIRING, report)

    def pairing(self) -> Dict[str, Any]:
        """What pairing.json holds; empty for a run without one (a teacher run, no distillation)."""
        path = self.path / self.PAIRING
        return json.loads(path.read_text()) if path.is_file() else {}

    @property
    def teacher_accuracy(self) -> Optional[TeacherAccuracy]:
        """The teacher's top-1/top-5 on this run's validation images, as the run recorded it; None for
        runs without a teacher and runs made before it was recorded."""
        return TeacherAccuracy.of_record(self.pairing(), "recorded")

    @property
    def teacher_val_top1(self) -> Optional[float]:
        accuracy = self.teacher_accuracy
        return accuracy.top1 if accuracy is not None else None

