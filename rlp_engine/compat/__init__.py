"""Drop-in replacements for other trainers' loss functions, backed by rlp_engine.ops.

`rlp_engine.compat.verl` mirrors verl 0.9.1's core_algos / torch_functional, `rlp_engine.compat.trl`
TRL 1.12's trainer utils, `rlp_engine.compat.openrlhf` OpenRLHF 0.11's model utils and GAE: same names,
parameter names, defaults, return structures, output dtypes and exceptions (tests/test_compat_*.py
compare them with the installed packages). None of those projects is imported here.
"""
