"""rlp_engine.models.export: a ScalarHeadModel written as a HF AutoModelForSequenceClassification
scores as ours when HF loads it with no rlp-engine code (fp32 rounding), on fresh random inputs with
left and right padding; so do OpenRLHF 0.11.2's reward model (get_llm_for_sequence_regression, loaded
as in test_compat_peers) and the AutoModelForTokenClassification that verl's reward worker loads. The
head's bias is refused, or dropped and recorded; the CLI's export-rm."""

import copy
import json

import pytest
import torch
from safetensors import safe_open
from test_compat_peers import _load
from tiny import tiny_llama
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

from rlp_engine import cli
from rlp_engine.models.export import BIAS_KEY, export_checkpoint, export_reward_model
from rlp_engine.models.heads import ScalarHeadModel, last_token_index, position_ids
from rlp_engine.models.loading import train_byte_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_byte_tokenizer(["0123456789+= abc"])


def reward_model(tokenizer, seed, bias=0.0):
    lm = tiny_llama(seed, vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96)
    rm = ScalarHeadModel.from_causal_lm(lm).eval()
    with torch.no_grad():
        rm.head.weight.normal_()  # fresh head: large enough that a wrong read shows
        rm.head.bias.fill_(bias)
    return rm


def padded_batch(tokenizer, side, lengths=(9, 1, 5, 13, 2)):
    """Random real tokens (never the pad id) of the given lengths, padded on `side` with the pad id:
    (input_ids, attention_mask) [B, max(lengths)]."""
    t = max(lengths)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(lengths), t), pad)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for i, n in enumerate(lengths):
        real = torch.randint(0, len(tokenizer) - 1, (n,))
        real = real + (real >= pad).long()  # skip the pad id
        cols = slice(t - n, t) if side == "left" else slice(0, n)
        ids[i, cols], mask[i, cols] = real, 1
    return ids, mask


def hf_scores(path, ids, mask):
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)


@pytest.mark.parametrize("seed", [0, 1])
def test_hf_scores_equal_ours(tokenizer, tmp_path, seed):
    torch.manual_seed(100 + seed)
    rm = reward_model(tokenizer, seed)
    assert export_reward_model(rm, tokenizer, tmp_path) == 0.0
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["pad_token_id"] == tokenizer.pad_token_id and len(config["id2label"]) == 1
    assert BIAS_KEY not in config
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert "score.weight" in keys and "score.bias" not in keys
        assert f.get_tensor("score.weight").shape == (1, 48)
    for side in ("left", "right"):
        ids, mask = padded_batch(tokenizer, side)
        with torch.no_grad():
            ours = rm.score(ids, mask)
        theirs = hf_scores(tmp_path, ids, mask)
        assert ours.std() > 0.1  # rows score differently: a wrong pooling index would show
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert AutoTokenizer.from_pretrained(tmp_path).pad_token_id == tokenizer.pad_token_id


def test_openrlhf_loads_the_export_as_its_reward_model(tokenizer, tmp_path):
    """OpenRLHF builds its RewardModel from the base model plus a bias-free `score` head and reads
    the reward at the last attention-mask position: the exported files load into it unchanged. It
    loads only bf16/fp16 weights, so ours is compared with its weights rounded to bf16, in fp32."""
    bare = ["openrlhf", "openrlhf.models", "openrlhf.trainer", "openrlhf.trainer.ppo_utils", "openrlhf.utils"]
    stubs = ["deepspeed", "ray", "peft", "flash_attn", "bitsandbytes"]
    (model_module,) = _load("openrlhf", bare=bare, stubs=stubs, modules=["openrlhf.models.model"])
    torch.manual_seed(5)
    rm = reward_model(tokenizer, 5)
    export_reward_model(rm, tokenizer, tmp_path)
    theirs = model_module.get_llm_for_sequence_regression(
        str(tmp_path), "reward", param_dtype="bf16", attn_implementation="sdpa"
    )
    theirs = theirs.float().eval()
    ours = copy.deepcopy(rm)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(p.bfloat16().float())
        for side in ("left", "right"):
            ids, mask = padded_batch(tokenizer, side)
            torch.testing.assert_close(theirs(ids, mask), ours.score(ids, mask), rtol=1e-5, atol=1e-5)


def test_verls_token_classification_load_scores_as_ours(tokenizer, tmp_path):
    """verl's reward worker loads AutoModelForTokenClassification (a `score` Linear with a bias, which
    the export lacks: HF reports it missing and initialises it to 0) and reads the last mask
    position with positions counted from the mask."""
    torch.manual_seed(6)
    rm = reward_model(tokenizer, 6)
    export_reward_model(rm, tokenizer, tmp_path)
    model = AutoModelForTokenClassification.from_pretrained(tmp_path).eval()
    for side in ("left", "right"):
        ids, mask = padded_batch(tokenizer, side)
        with torch.no_grad():
            per_token = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
            theirs = per_token.squeeze(-1)[torch.arange(ids.shape[0]), last_token_index(mask)]
            torch.testing.assert_close(theirs, rm.score(ids, mask), rtol=1e-5, atol=1e-5)


def test_a_non_zero_bias_is_refused_or_dropped_and_recorded(tokenizer, tmp_path):
    torch.manual_seed(7)
    rm = reward_model(tokenizer, 2, bias=0.375)
    with pytest.raises(ValueError, match="bias is 0.375.*drop_bias=True"):
        export_reward_model(rm, tokenizer, tmp_path)
    assert not (tmp_path / "config.json").exists()
    assert export_reward_model(rm, tokenizer, tmp_path, drop_bias=True) == 0.375
    assert json.loads((tmp_path / "config.json").read_text())[BIAS_KEY] == 0.375
    ids, mask = padded_batch(tokenizer, "left")
    with torch.no_grad():
        ours = rm.score(ids, mask)
    torch.testing.assert_close(hf_scores(tmp_path, ids, mask), ours - 0.375, rtol=1e-5, atol=1e-5)


def test_bad_arguments(tokenizer, tmp_path):
    rm = reward_model(tokenizer, 3)
    with pytest.raises(TypeError, match="rm must be a ScalarHeadModel"):
        export_reward_model(rm.backbone, tokenizer, tmp_path)
    no_pad = train_byte_tokenizer(["012"])
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="tokenizer has no pad token"):
        export_reward_model(rm, no_pad, tmp_path)
    with pytest.raises(FileNotFoundError, match="not a reward-model checkpoint"):
        export_checkpoint(tmp_path, tmp_path / "out")


def test_cli_export_rm(tokenizer, tmp_path, capsys):
    torch.manual_seed(11)
    ckpt = tmp_path / "run" / "checkpoints" / "rm"
    rm = reward_model(tokenizer, 4, bias=-0.5)
    rm.save_pretrained(ckpt)  # as the pipeline writes checkpoints/rm
    tokenizer.save_pretrained(ckpt)
    out = tmp_path / "exported"
    assert cli.main(["export-rm", "--checkpoint", str(ckpt), "--out", str(out)]) == 2
    assert "drop_bias=True (CLI: --drop-bias)" in capsys.readouterr().err
    assert cli.main(["export-rm", "--checkpoint", str(ckpt), "--out", str(ckpt), "--drop-bias"]) == 2
    assert "replaced" in capsys.readouterr().err
    assert cli.main(["export-rm", "--checkpoint", str(ckpt), "--out", str(out), "--drop-bias"]) == 0
    assert "bias -0.5 is left out" in capsys.readouterr().out
    ids, mask = padded_batch(tokenizer, "right")
    with torch.no_grad():
        ours = ScalarHeadModel.from_pretrained(ckpt).eval().score(ids, mask)
    torch.testing.assert_close(hf_scores(out, ids, mask), ours + 0.5, rtol=1e-5, atol=1e-5)
