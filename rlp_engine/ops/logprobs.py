"""Placeholder until this op family lands (being written now)."""



def entropy_from_logits(*args, **kwargs):
    raise NotImplementedError("entropy_from_logits")


def logprobs_from_logits(*args, **kwargs):
    raise NotImplementedError("logprobs_from_logits")
