"""Progress: a tqdm bar on a terminal, one line per phase in a log."""

from __future__ import annotations

import io

from tqdm import tqdm

from cskd.progress import LineProgress, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_phases(stream, phases: int = 3, steps: int = 50, enabled: bool = True) -> None:
    for phase in range(phases):
        with progress(steps, f"epoch {phase + 1}/{phases}", "step", enabled, file=stream) as bar:
            for i in range(steps):
                bar.update(1)
                if i % 10 == 0:
                    bar.set_postfix(loss=f"{1.0 / (i + 1):.3f}")


def test_off_a_terminal_each_phase_is_one_line_without_carriage_returns():
    log = io.StringIO()
    run_phases(log)
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 3
    assert [line.split(":")[0] for line in lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert all(" 50/50 step in " in line and line.endswith("loss=0.024") for line in lines), lines


def test_on_a_terminal_it_is_a_tqdm_bar():
    screen = Terminal()
    bar = progress(10, "eval", "batch", file=screen)
    assert isinstance(bar, tqdm)
    bar.update(10)
    bar.close()
    assert "\r" in screen.getvalue()


def test_disabled_progress_writes_nothing_anywhere():
    for stream in (io.StringIO(), Terminal()):
        run_phases(stream, enabled=False)
        assert stream.getvalue() == ""


def test_a_phase_interrupted_by_an_error_still_logs_where_it_stopped():
    log = io.StringIO()
    try:
        with progress(8, "teacher cache", "img", file=log) as bar:
            bar.update(3)
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert log.getvalue().startswith("teacher cache: 3/8 img in ")
    assert isinstance(bar, LineProgress) and log.getvalue().count("\n") == 1
