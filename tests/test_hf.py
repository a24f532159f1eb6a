"""Hugging Face models as workloads: config resolution and its errors, layers and plans read off the
model, pipeline stages that compute what the model's own forward does, and the search's description.

Everything here builds tiny models in this process (or one describe child); the multi-process
equivalence of every layout on them is in tests/test_parallel.py.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from cotune.config import WorkloadConfig
from cotune.errors import UserError
from cotune.trial.hf import build_hf, resolve_config
from cotune.trial.workloads import Workload, tp_plan_problem, unsupported

SEQ, VOCAB = 16, 300
TINY = {
    "hf:llama": {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "intermediate_size": 64},
    "hf:mistral": {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "intermediate_size": 64, "sliding_window": None},
    "hf:qwen2": {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "intermediate_size": 64},
    "hf:gpt2": {"n_embd": 32, "n_layer": 4, "n_head": 4},
    "hf:bert": {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 64},
}


def tiny(model: str, **overrides) -> WorkloadConfig:
    fields, objective = resolve_config(model, {**TINY[model], **overrides}, seq_len=SEQ, vocab_size=VOCAB,
                                       eot_id=256, pad_id=None)
    return WorkloadConfig(model=model, config=fields, objective=objective, seq_len=SEQ, vocab_size=VOCAB)


# ---------------------------------------------------------------------------- resolving the config


def test_cotune_sets_vocabulary_positions_dropout_and_token_ids_and_the_space_wins():
    fields, objective = resolve_config("hf:gpt2", {"n_embd": 32, "n_layer": 2, "n_head": 4, "attn_pdrop": 0.2},
                                       seq_len=2048, vocab_size=VOCAB, eot_id=256, pad_id=257)
    assert objective == "causal_lm"
    assert fields["vocab_size"] == VOCAB
    assert fields["n_positions"] == 2048  # GPT-2's 1024 positions would not cover seq_len
    assert fields["resid_pdrop"] == fields["embd_pdrop"] == 0.0 and fields["attn_pdrop"] == 0.2  # the space's kept
    assert fields["bos_token_id"] == fields["eos_token_id"] == 256 and fields["pad_token_id"] == 257
    from transformers import AutoConfig

    rebuilt = AutoConfig.for_model("gpt2", **fields)  # the recorded fields rebuild the model that ran
    assert (rebuilt.n_embd, rebuilt.n_positions, rebuilt.vocab_size) == (32, 2048, VOCAB)


def test_bert_is_masked_lm_and_its_padding_row_is_not_a_real_token():
    fields, objective = resolve_config("hf:bert", TINY["hf:bert"], seq_len=SEQ, vocab_size=VOCAB, eot_id=256,
                                       pad_id=None)
    assert objective == "masked_lm"
    assert fields["pad_token_id"] is None  # BERT's default 0 would freeze token 0's embedding row
    assert fields["hidden_dropout_prob"] == fields["attention_probs_dropout_prob"] == 0.0


@pytest.mark.parametrize("model, fields, message", [
    ("hf:lama", {}, r"'hf:lama' is not a transformers model type \(did you mean llama"),
    ("hf:llama", {"hiden_size": 64}, r"workload.config.hiden_size: llama's config has no field 'hiden_size'; "
                                     r"did you mean hidden_size"),
    ("hf:llama", {"hidden_size": 30, "num_attention_heads": 4},
     r"num_attention_heads must divide hidden_size, but got hidden_size=30, num_attention_heads=4"),
    ("hf:llama", {"num_attention_heads": 8, "num_key_value_heads": 3}, r"num_key_value_heads must divide"),
    ("hf:llama", {"vocab_size": 100}, r"vocab_size >= the tokenizer's vocabulary must hold, but got vocab_size=100"),
    ("hf:gpt2", {"n_positions": 8}, r"max_position_embeddings >= seq_len must hold, but got max_position_embeddings=8"),
    ("hf:some-org/some-model", {}, r"not on this machine, and cotune downloads nothing.*hf download some-org/some-model"),
    ("hf:./no/such/folder", {}, r"the folder no/such/folder does not exist"),
    ("hf:t5", {}, r"neither a causal-LM nor a masked-LM head"),
])
def test_bad_model_input_is_one_sentence_naming_the_field(model, fields, message):
    with pytest.raises(UserError, match=message):
        resolve_config(model, fields, seq_len=SEQ, vocab_size=VOCAB, eot_id=256, pad_id=None)


def test_a_local_folder_is_read_and_a_folder_without_config_is_an_error(tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model("llama", **TINY["hf:llama"]).save_pretrained(tmp_path / "mine")
    fields, objective = resolve_config(f"hf:{tmp_path / 'mine'}", {}, seq_len=SEQ, vocab_size=VOCAB, eot_id=0,
                                       pad_id=None)
    assert objective == "causal_lm" and fields["vocab_size"] == VOCAB  # a config without weights takes the tokenizer's
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        resolve_config(f"hf:{tmp_path / 'empty'}", {}, seq_len=SEQ, vocab_size=VOCAB, eot_id=0, pad_id=None)


# ---------------------------------------------------------------------------- what is read off the model


@pytest.mark.parametrize("model, layers, layer_class", [
    ("hf:llama", "model.model.layers", "LlamaDecoderLayer"),
    ("hf:gpt2", "model.transformer.h", "GPT2Block"),
    ("hf:bert", "model.bert.encoder.layer", "BertLayer"),
])
def test_layers_come_from_no_split_modules_and_every_layout_knob_runs(model, layers, layer_class):
    w = build_hf(tiny(model))
    assert w.layers == layers and type(w.layer_list()[0]).__name__ == layer_class
    assert len(w.layer_list()) == 4
    reasons = unsupported(w)
    assert reasons["tp"] == reasons["pp"] == reasons["activation_checkpointing"] == ""
    if model == "hf:bert":  # post-norm: its LayerNorms follow the residual addition inside the output modules
        assert reasons["sequence_parallel"].startswith("sequence parallel of hf:bert is not run yet")
    else:
        assert reasons["sequence_parallel"] == ""
    if model == "hf:llama":  # its rotary embedding is computed once, before the first layer
        assert reasons["sequence_parallel_with_pp"] == (
            "sequence parallel across pipeline stages of LlamaForCausalLM is not run yet")


def test_llama_tp_plan_is_its_own_base_model_tp_plan_per_layer():
    w = build_hf(tiny("hf:llama"))
    from transformers import AutoConfig

    own = AutoConfig.for_model("llama").base_model_tp_plan
    assert w.tp_plan == {k.removeprefix("layers.*."): v for k, v in own.items()}
    assert w.tp_plan["self_attn.q_proj"] == "colwise" and w.tp_plan["mlp.down_proj"] == "rowwise"


@pytest.mark.parametrize("model", list(TINY))
def test_pipeline_stages_chained_compute_the_models_own_logits(model):
    torch.manual_seed(0)
    w = build_hf(tiny(model))
    x = torch.randint(0, 256, (2, SEQ))
    own = w.model(x)  # the transformers model's own forward
    stages = [w.stage(w.model, 0, 1, True, False), w.stage(w.model, 1, 3, False, False),
              w.stage(w.model, 3, 4, False, True)]
    h = x
    for stage in stages:
        h = stage(h)
    torch.testing.assert_close(h, own, rtol=0, atol=1e-6)
    if w.tied is not None:  # the tied matrix is a parameter of the first and of the last stage
        assert stages[0].get_parameter(w.tied[0]).shape == stages[-1].get_parameter(w.tied[1]).shape


def test_gpt2_qkv_regrouping_gives_each_tp_rank_whole_heads_and_keeps_the_layer_exact():
    torch.manual_seed(0)
    w = build_hf(tiny("hf:gpt2"))
    layer = w.layer_list()[0]
    h = torch.randn(2, SEQ, 32)
    before = layer(h)
    as_linear = copy.deepcopy(layer)
    w.tp_prepare(as_linear, 1)  # Conv1D -> nn.Linear, same values
    assert isinstance(as_linear.attn.c_attn, nn.Linear)
    torch.testing.assert_close(as_linear(h), before, rtol=0, atol=1e-6)
    regrouped = copy.deepcopy(layer)
    w.tp_prepare(regrouped, 2)
    rows = regrouped.attn.c_attn.weight  # (3C, C): rank r takes rows [r * 3C/2, (r + 1) * 3C/2)
    q, k, v = as_linear.attn.c_attn.weight.split(32)
    torch.testing.assert_close(rows[:48], torch.cat([q[:16], k[:16], v[:16]]))
    torch.testing.assert_close(rows[48:], torch.cat([q[16:], k[16:], v[16:]]))
    assert regrouped.attn.split_size == 16


def test_a_plan_that_matches_nothing_or_no_linear_is_a_reason_not_a_silent_no_op():
    model = build_hf(tiny("hf:llama")).model
    w = Workload(model=model, layers="model.model.layers", tp_plan={"attn.q": "colwise"})
    assert "matches no submodule of LlamaDecoderLayer, so tp would shard nothing" in tp_plan_problem(w)
    w = Workload(model=model, layers="model.model.layers", tp_plan={"input_layernorm": "colwise"})
    assert "names a LlamaRMSNorm, not an nn.Linear" in tp_plan_problem(w)
    w = Workload(model=model, layers="model.model.layers", tp_plan={"self_attn.q_proj": "colwise_gather_output"})
    assert "style 'colwise_gather_output'" in tp_plan_problem(w)


def test_a_family_without_plan_or_stages_says_why():
    fields, objective = resolve_config("hf:roberta", {"hidden_size": 32, "num_hidden_layers": 2,
                                                      "num_attention_heads": 4, "intermediate_size": 64},
                                       seq_len=SEQ, vocab_size=VOCAB, eot_id=0, pad_id=None)
    w = build_hf(WorkloadConfig(model="hf:roberta", config=fields, objective=objective, seq_len=SEQ,
                                vocab_size=VOCAB))
    reasons = unsupported(w)
    assert "has no tensor-parallel plan" in reasons["tp"]
    assert "pipeline stages of hf:roberta are not run yet" in reasons["pp"]
    assert reasons["activation_checkpointing"] == ""


# ---------------------------------------------------------------------------- the search's description


@pytest.fixture(scope="module")
def llama_info(tmp_path_factory):
    from cotune import workload
    from cotune.space import WorkloadSpec

    spec = WorkloadSpec(model="hf:llama", config=TINY["hf:llama"], seq_len=SEQ)
    return workload.describe(spec, vocab_size=VOCAB, eot_id=0, pad_id=2, cache_dir=tmp_path_factory.mktemp("c"))


def test_the_search_learns_shape_parameters_and_reasons(llama_info):
    assert (llama_info.n_layer, llama_info.n_embd, llama_info.n_head, llama_info.n_kv_head) == (4, 32, 4, 2)
    assert llama_info.ffn_hidden == 64 and llama_info.objective == "causal_lm"
    torch.manual_seed(0)
    built = build_hf(WorkloadConfig(model="hf:llama", config=llama_info.config, objective="causal_lm",
                                    seq_len=SEQ, vocab_size=VOCAB))
    assert llama_info.n_params == sum(p.numel() for p in built.model.parameters())
    assert llama_info.kernels == ("cross_entropy",)
    assert llama_info.config["pad_token_id"] == 2 and llama_info.config["vocab_size"] == VOCAB


@pytest.mark.slow
def test_describe_is_cached_and_a_bad_field_is_a_user_error(tmp_path):
    from cotune import workload
    from cotune.space import WorkloadSpec

    spec = WorkloadSpec(model="hf:gpt2", config={"n_embd": 32, "n_layer": 2, "n_head": 4}, seq_len=SEQ)
    first = workload.describe(spec, vocab_size=VOCAB, cache_dir=tmp_path)
    cached = list((tmp_path / "workloads").glob("*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["n_layer"] == 2
    assert workload.describe(spec, vocab_size=VOCAB, cache_dir=tmp_path) == first
    bad = WorkloadSpec(model="hf:gpt2", config={"n_embed": 32}, seq_len=SEQ)
    with pytest.raises(UserError, match="workload.config.n_embed: gpt2's config has no field 'n_embed'"):
        workload.describe(bad, vocab_size=VOCAB, cache_dir=tmp_path)


def test_layout_rules_use_the_models_heads_and_reasons(llama_info):
    from cotune import derive
    from cotune.space import SearchSpace

    space = SearchSpace.model_validate({
        "name": "t", "workload": {"model": "hf:llama", "config": TINY["hf:llama"], "seq_len": SEQ},
        "knobs": {"world_size": {"choices": [4]}, "tp": {"choices": [1, 2, 4]}},
    })

    def reason(**knobs) -> str:
        return derive.build_config(space, {"world_size": 4, "global_batch_size": 8, **knobs}, world_size=4,
                                   vocab_size=VOCAB, workload=llama_info)[1]

    assert reason(tp=2) == ""
    assert "n_kv_head % tp == 0" in reason(tp=4) and "n_kv_head=2" in reason(tp=4)  # 2 kv heads on 4 ranks
    assert reason(tp=2, sequence_parallel=True) == ""
    assert reason(tp=2, pp=2, sequence_parallel=True) == (
        "sequence_parallel_with_pp=True cannot run on hf:llama: sequence parallel across pipeline stages of "
        "LlamaForCausalLM is not run yet")
    assert "mlp_kernel=triton cannot run on hf:llama" in reason(mlp_kernel="triton")
    config, _ = derive.build_config(space, {"world_size": 4, "global_batch_size": 8, "tp": 2}, world_size=4,
                                    vocab_size=VOCAB, workload=llama_info)
    assert config.workload.config == llama_info.config and config.workload.n_kv_head == 2


def test_masked_lm_batches_mask_fifteen_percent_and_never_a_special_token():
    import numpy as np

    from cotune.trial import batches

    tokens = np.arange(10_000, dtype=np.uint16) % 250
    tokens[::50] = 256  # end-of-text tokens
    masking = batches.Masking(mask_id=257, vocab_size=258, special_ids=(256, 257))
    starts = np.arange(0, 9000, 100)
    x, y = batches.masked_lm(tokens, starts, 64, batches.mask_seeds(np.random.default_rng(0), len(starts)), masking)
    window = tokens[starts[:, None] + np.arange(64)].astype(np.int64)
    predicted = y != batches.IGNORE
    assert 0.12 < predicted.mean() < 0.18
    assert not predicted[window == 256].any()
    assert (y[predicted] == window[predicted]).all()
    shown_as_mask = (x == 257) & predicted
    assert 0.7 < shown_as_mask.sum() / predicted.sum() < 0.9  # 80% masked, the rest random or kept
    assert (x[~predicted] == window[~predicted]).all()
    again = batches.masked_lm(tokens, starts, 64, batches.mask_seeds(np.random.default_rng(0), len(starts)),
                             masking)
    assert (again[0] == x).all() and (again[1] == y).all()  # the same seeds give the same masks


def test_a_field_the_config_folds_into_another_is_accepted():
    """transformers 5 keeps Llama's rope_theta inside rope_parameters; the space may still say rope_theta."""
    fields, _ = resolve_config("hf:llama", {**TINY["hf:llama"], "rope_theta": 500000.0}, seq_len=SEQ,
                               vocab_size=VOCAB, eot_id=0, pad_id=None)
    from transformers import AutoConfig

    assert AutoConfig.for_model("llama", **fields).rope_parameters["rope_theta"] == 500000.0


def test_a_local_checkpoint_is_loaded_with_its_weights(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(1)
    saved = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **TINY["hf:llama"], vocab_size=VOCAB))
    saved.save_pretrained(tmp_path / "ckpt")
    model = f"hf:{tmp_path / 'ckpt'}"
    fields, objective = resolve_config(model, {}, seq_len=SEQ, vocab_size=VOCAB, eot_id=0, pad_id=None)
    assert "vocab_size" not in fields  # a checkpoint keeps its own vocabulary
    torch.manual_seed(2)  # a different seed: only loading the weights can make them equal
    w = build_hf(WorkloadConfig(model=model, config=fields, objective=objective, seq_len=SEQ, vocab_size=VOCAB))
    torch.testing.assert_close(w.model.model.model.embed_tokens.weight, saved.model.embed_tokens.weight)
    with pytest.raises(UserError, match="the checkpoint's vocab_size >= the tokenizer's vocabulary must hold"):
        resolve_config(model, {}, seq_len=SEQ, vocab_size=VOCAB + 1, eot_id=0, pad_id=None)
