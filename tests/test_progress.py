"""Progress bars degrade to plain periodic lines when they do not write to a terminal (logs, CI, pipes)."""

import io

from lowbit_ft.progress import LineProgress, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_into_a_file_writes_plain_lines(monkeypatch):
    monkeypatch.setattr("lowbit_ft.progress.LOG_INTERVAL_S", 0.0)  # a line on every update
    log = io.StringIO()
    bar = progress_bar(range(5), desc="quantizing", file=log)
    assert isinstance(bar, LineProgress)
    assert list(bar) == [0, 1, 2, 3, 4]
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines and all(line.startswith("quantizing: ") for line in lines)
    assert lines[-1].startswith("quantizing: 100% 5/5 [")


def test_lines_are_periodic_not_per_update():
    log = io.StringIO()
    for _ in progress_bar(range(1000), desc="loading", file=log):
        pass
    lines = log.getvalue().splitlines()
    assert len(lines) <= 2 and lines[-1].startswith("loading: 100% 1000/1000 [")  # first state and the final one


def test_without_a_total_a_line_gives_the_count():
    log = io.StringIO()
    bar = progress_bar(desc="scoring", file=log)
    bar.update(3)
    bar.close()
    assert log.getvalue().splitlines()[-1].startswith("scoring: 3 [")


def test_a_bar_on_a_terminal_stays_live():
    screen = Terminal()
    bar = progress_bar(range(3), desc="x", file=screen)
    list(bar)
    assert not isinstance(bar, LineProgress) and "\r" in screen.getvalue()
