"""Drop-in replacements for other trainers' loss functions, backed by rlp_engine.ops.

`rlp_engine.compat.verl` mirrors verl's core_algos / torch_functional, `rlp_engine.compat.trl` TRL's
trainer utils, `rlp_engine.compat.openrlhf` OpenRLHF's model utils: same names, parameter names,
defaults, return structures and exceptions. None of those projects is imported.
"""
