"""rlp-engine: fused RLHF loss kernels and Reward Learning on Policy."""

import logging

__version__ = "0.1.0"

# Library logging practice: records go to the application's handlers; with none configured nothing
# prints (not even logging's last-resort stderr handler). The CLI adds its stdout handler
# (engine.metrics.log_to_console).
logging.getLogger(__name__).addHandler(logging.NullHandler())
