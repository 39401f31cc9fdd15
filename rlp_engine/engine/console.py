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


# The loggers whose INFO records the CLI prints: the metrics lines. Other rlp_engine loggers keep
# their level (their INFO diagnostics, e.g. rlp_engine.engine's offload and weight-sync records, stay
# off unless the user turns them on).
CONSOLE_LOGGERS = ("rlp_engine.engine.metrics",)


class ConsoleHandler(logging.Handler):
    """A logging handler that prints each record's formatted message as one line: INFO and below on
    stdout through `_write_line` (above an active tqdm bar, not through it), WARNING and above on
    stderr (where logging's last-resort handler put them before the package had a handler). The
    stream is looked up at each record, so redirections and pytest's capture see it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            if record.levelno >= logging.WARNING:
                print(line, file=sys.stderr, flush=True)
            else:
                _write_line(line)
        except Exception:  # logging's contract: a failing handler reports, never raises
            self.handleError(record)


def log_to_console(level: int = logging.INFO) -> logging.Handler:
    """What the CLI shows: the CONSOLE_LOGGERS' records at `level` and above, and any rlp_engine
    logger's warnings, printed as bare messages (ConsoleHandler on the "rlp_engine" logger).
    Idempotent: a second call in one process returns the handler the first added instead of adding
    another (no doubled lines)."""
    for name in CONSOLE_LOGGERS:
        logging.getLogger(name).setLevel(level)
    root = logging.getLogger("rlp_engine")
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
