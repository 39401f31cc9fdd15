"""Placeholder until this op family lands (being written now)."""



def compute_gae(*args, **kwargs):
    raise NotImplementedError("compute_gae")
