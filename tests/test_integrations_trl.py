"""rlp_engine.integrations.trl.FusedGRPOTrainer against the installed, stock TRL 1.12 GRPOTrainer on a
tiny Llama: the log-prob method itself (values where TRL's loss reads them, entropies, gradients), and
five training steps of each trainer from the same weights and seed (same losses, metrics and weights
within fp32 noise). TRL's trainer module is loaded as in test_compat_peers (its imports of datasets,
pandas, pyarrow and of the HTTP client of its vLLM server are stubs: none is installed, and none is
used on this path); the dataset is then a list rows type that passes TRL's Dataset check."""

import functools
import importlib
import os
import sys

import pytest
import torch
from test_compat_peers import _load, seeded

_ = seeded
PROMPTS = ["2+3=", "12+34=", "1+1=", "405+5=", "3+3=", "0+7=", "66+2=", "5+4="]
_STUBS = ["pandas", "datasets", "pyarrow", "requests", "urllib3"]


@functools.cache
def trl_grpo():
    """(trl.trainer.grpo_trainer, trl.trainer.grpo_config) of the installed TRL 1.12."""
    pytest.importorskip("accelerate")
    for name in (
        "transformers.modeling_utils",
        "transformers.models.auto.auto_factory",
        "transformers.trainer",
    ):
        importlib.import_module(name)  # before any stub exists (transformers' availability probes)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    return _load(
        "trl",
        bare=["trl", "trl.trainer"],
        stubs=_STUBS,
        modules=["trl.trainer.grpo_trainer", "trl.trainer.grpo_config"],
    )


def dataset(grpo_module, rows):
    """A training dataset GRPOTrainer accepts: datasets.Dataset when installed, else a list whose type
    subclasses the stub Dataset class (with the `cache_files` TRL's telemetry reads)."""
    cls = grpo_module.Dataset
    if hasattr(cls, "from_list"):  # the real datasets.Dataset
        return cls.from_list(rows)
    return type("Rows", (list, cls), {"cache_files": []})(rows)


def char_tokenizer():
    """One token per character of "0123456789+=" plus <pad> and <eos> (14 tokens: random tiny models
    end about 1 completion in 14 tokens early, so completions have padding)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate("0123456789+=")}
    vocab.update({"<pad>": 12, "<eos>": 13})
    t = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    t.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    t.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<eos>")
    tok.padding_side = "left"
    return tok


def save_tiny_llama(path, tokenizer, seed=0, **config):
    """A seeded tiny LlamaForCausalLM sized to `tokenizer`, saved with it to `path` (TRL loads its
    reference model from the policy's path)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    cfg = LlamaConfig(
        **{"num_key_value_heads": 2, **sizes, **config},
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def distinct_chars(completions, **kwargs):
    """A reward that varies within each group: distinct characters per character."""
    return [len(set(c)) / (1 + len(c)) for c in completions]


def make_trainer(cls, model_dir, out_dir, tokenizer, **overrides):
    grpo, config = trl_grpo()
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    fields = dict(
        output_dir=str(out_dir),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=5,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        temperature=0.9,
        disable_tqdm=True,
        bf16=False,  # GRPOConfig's default True runs the forward under CPU bf16 autocast
    )
    args = config.GRPOConfig(**{**fields, **overrides})
    data = dataset(grpo, [{"prompt": p} for p in PROMPTS])
    return cls(
        model=model_dir,
        reward_funcs=distinct_chars,
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tok = char_tokenizer()
    return tok, save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), tok)


def fused_class():
    trl_grpo()
    from rlp_engine.integrations import trl as integration

    return integration.FusedGRPOTrainer


def test_is_a_grpo_trainer_overriding_one_method():
    grpo, _ = trl_grpo()
    cls = fused_class()
    assert cls.__bases__ == (grpo.GRPOTrainer,)
    assert {k for k in vars(cls) if not k.startswith("__")} == {"_get_per_token_logps_and_entropies"}


def _padded_batch(tokenizer, completion_len):
    """Prompts left-padded, completions of random tokens right-padded with holes in the mask (as
    TRL concatenates them): (input_ids [B, T], attention_mask [B, T], completion_mask [B, K])."""
    enc = tokenizer(PROMPTS[:5], return_tensors="pt", padding=True)
    b = enc.input_ids.shape[0]
    comp = torch.randint(0, 12, (b, completion_len))
    lengths = torch.tensor([completion_len, 3, 1, completion_len - 2, 5])
    cmask = (torch.arange(completion_len) < lengths[:, None]).long()
    comp = comp.masked_fill(cmask == 0, tokenizer.pad_token_id)
    return torch.cat([enc.input_ids, comp], 1), torch.cat([enc.attention_mask, cmask], 1), cmask


@pytest.mark.parametrize("entropy_coef", [0.0, 0.1])
def test_logps_and_entropies_match_trls_method(tiny, tmp_path, entropy_coef):
    tok, path = tiny
    grpo, _ = trl_grpo()
    trainer = make_trainer(fused_class(), path, tmp_path, tok, entropy_coef=entropy_coef, temperature=0.7)
    ids, mask, cmask = _padded_batch(tok, completion_len=7)
    model = trainer.model
    out = []
    stock = functools.partial(grpo.GRPOTrainer._get_per_token_logps_and_entropies, trainer)
    for method in (trainer._get_per_token_logps_and_entropies, stock):
        model.zero_grad()
        logps, ent, aux = method(model, ids, mask, 7, batch_size=3, compute_entropy=True)
        assert aux is None and logps.shape == ent.shape == cmask.shape
        assert ent.requires_grad == (entropy_coef != 0.0)
        loss = (logps * cmask).sum() + ((ent * cmask).sum() if ent.requires_grad else 0.0)
        loss.backward()
        out.append((logps.detach(), ent.detach(), [p.grad.clone() for p in model.parameters()]))
    (lp, ent, grads), (want_lp, want_ent, want_grads) = out
    keep = cmask.bool()
    torch.testing.assert_close(lp[keep], want_lp[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent[keep], want_ent[keep], rtol=1e-5, atol=1e-5)
    assert torch.all(lp[~keep] == 0) and torch.all(ent[~keep] == 0)  # padding: 0 (TRL's loss masks it)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_vision_moe_or_peft_use_trls_own_method(tiny, tmp_path, monkeypatch):
    tok, path = tiny
    grpo, _ = trl_grpo()
    trainer = make_trainer(fused_class(), path, tmp_path, tok)
    calls = []
    monkeypatch.setattr(
        grpo.GRPOTrainer, "_get_per_token_logps_and_entropies", lambda self, *a, **k: calls.append(k) or "trl"
    )
    ids, mask, _ = _padded_batch(tok, completion_len=4)
    method = functools.partial(trainer._get_per_token_logps_and_entropies, trainer.model, ids, mask, 4)
    assert method(pixel_values=ids) == "trl"
    assert method(compute_aux_loss=True) == "trl"
    assert method()[0].shape == (5, 4)
    assert len(calls) == 2
    monkeypatch.setattr(trainer.model, "peft_config", {}, raising=False)  # a PEFT model's marker
    assert method() == "trl" and len(calls) == 3


def _lm_head_lengths(trainer):
    """Record the sequence length of every input to the policy's and reference model's LM heads."""
    seen = []
    for m in (trainer.model, getattr(trainer, "ref_model", None)):
        if m is not None:
            m.get_output_embeddings().register_forward_pre_hook(
                lambda mod, args: seen.append(args[0].shape[1])
            )
    return seen


CONFIGS = {
    "kl+old-logps": {"beta": 0.05, "num_iterations": 2},
    "entropy-bonus+dr_grpo": {"beta": 0.0, "entropy_coef": 0.05, "loss_type": "dr_grpo"},
}
_NOT_COMPARED = {"step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second"}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_five_steps_match_stock_trl(tiny, tmp_path, name):
    tok, path = tiny
    grpo, _ = trl_grpo()
    runs = []
    for cls in (grpo.GRPOTrainer, fused_class()):
        trainer = make_trainer(cls, path, tmp_path / cls.__name__, tok, **CONFIGS[name])
        lengths = _lm_head_lengths(trainer)
        trainer.train()
        runs.append((trainer, lengths))
    (stock, stock_len), (fused, fused_len) = runs
    # The fused trainer calls the LM head only in generation (one position per decode step); stock
    # TRL also on whole sequences for the log-probs.
    assert max(stock_len) > 1 and max(fused_len) == 1
    logs, want = fused.state.log_history, stock.state.log_history
    assert len(logs) == len(want) == 6 and [set(x) for x in logs] == [set(x) for x in want]
    assert any(x.get("completions/min_length", 8) < 8 for x in want)  # completions with padding
    for got, ref in zip(logs, want):
        for key in set(ref) - _NOT_COMPARED:
            assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-5), (key, got[key], ref[key])
    for (n, p), q in zip(fused.model.named_parameters(), stock.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4, msg=n)


def test_without_trl_a_clear_import_error(monkeypatch):
    from rlp_engine.integrations import trl as integration

    integration._fused_class.cache_clear()
    monkeypatch.setitem(sys.modules, "trl.trainer.grpo_trainer", None)
    try:
        with pytest.raises(ImportError, match=r"needs TRL \(pip install trl==1.12.0\)"):
            _ = integration.FusedGRPOTrainer
    finally:
        integration._fused_class.cache_clear()
