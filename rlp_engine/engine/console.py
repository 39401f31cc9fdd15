"""Console output without torch (the CLI configures it before the slow imports): the handler that
prints the "rlp_engine" logger's records to stdout above any tqdm bar (`log_to_console`), and the
progress bars of training loops, sampling and evaluation (`progress`)."""

from __future__ import annotations

import logging
import sys


def _write_line(line: str) -> None:
    """Print `line` above any tqdm progress bar (plain print without tqdm)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        print(line, flush=True)
        return
    tqdm.write(line)
    sys.stdout.flush()  # a pipe (a log file, a supervising process) sees each step as it ends


class ConsoleHandler(logging.Handler):
    """A logging handler that prints each record's formatted message as one line on stdout (the
    current sys.stdout at each record, so redirections and pytest's capture see it), through
    `_write_line`: above an active tqdm bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _write_line(self.format(record))
        except Exception:  # logging's contract: a failing handler reports, never raises
            self.handleError(record)


def log_to_console(level: int = logging.INFO) -> logging.Handler:
    """Print the "rlp_engine" logger's records at `level` and above to stdout as bare messages
    (what the CLI shows: the metrics lines). Idempotent: a second call in one process returns the
    handler the first added instead of adding another (no doubled lines)."""
    root = logging.getLogger("rlp_engine")
    root.setLevel(level)
    for handler in root.handlers:
        if isinstance(handler, ConsoleHandler):
            return handler
    handler = ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    return handler


def progress(iterable, *, desc: str, enabled: bool, total: int | None = None):
    """tqdm over `iterable` when enabled (and tqdm is installed), else the iterable itself. The bar
    goes to stderr and only when stderr is a terminal (tqdm's disable=None): a log file or a
    supervising process's pipe gets no bar redraws. Iterating draws no random numbers."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, dynamic_ncols=True, leave=False, disable=None)
