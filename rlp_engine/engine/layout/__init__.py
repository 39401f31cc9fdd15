"""Training layouts: how the modules of one optimizer are laid out over the ranks (FSDP2 or DeepSpeed
ZeRO-3) and stepped. fsdp.py and zero3.py are the only files that know the backend."""
