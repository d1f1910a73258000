"""Config parsing across the family, tensor naming and units, and the TP/EP divisibility rules."""

from __future__ import annotations

import json
import warnings

import pytest

from quantkit.arch import MiniMaxM2Config, check_parallel, valid_degrees, warn_extra_layers
from quantkit.errors import QuantkitError
from quantkit.synth import release_config

SPECIAL = {"bos_token_id": 200019, "eos_token_id": 200020}


def m2_config(**overrides) -> dict:
    raw = release_config("minimax-m2", None, fp8=True, special_ids=SPECIAL)
    raw.update(overrides)
    return raw


def test_full_model_counts_match_the_release():
    cfg = MiniMaxM2Config.from_dict(m2_config())
    total, active = cfg.parameter_count()
    assert 228.6e9 < total < 228.8e9  # "230B"
    assert 10e9 < active < 11.1e9  # "A10B", embeddings and head included
    names = cfg.expected_tensors()
    # 62 x (10 non-expert + 256 x 3 experts) + embed, norm, lm_head (the FP8 scales add 4 + 768 per layer)
    assert len(names) == 62 * (10 + 768) + 3
    assert names["model.layers.61.block_sparse_moe.experts.255.w2.weight"].shape == (3072, 1536)
    assert names["model.layers.0.self_attn.q_norm.weight"].shape == (6144,)
    assert [u.name for u in cfg.units()][:2] == ["embed", "layers.0"] and cfg.units()[-1].name == "head"
    assert cfg.block_fp8 and cfg.weight_block_size == (128, 128)


def test_rotary_width_from_rotary_dim_or_partial_factor():
    assert MiniMaxM2Config.from_dict(m2_config()).rotary_dim == 64
    raw = m2_config()
    del raw["rotary_dim"]
    raw["partial_rotary_factor"] = 0.5
    assert MiniMaxM2Config.from_dict(raw).rotary_dim == 64
    del raw["partial_rotary_factor"]
    raw["rope_parameters"] = {"rope_theta": 1e6, "partial_rotary_factor": 0.25, "rope_type": "default"}
    del raw["rope_theta"]
    cfg = MiniMaxM2Config.from_dict(raw)
    assert cfg.rotary_dim == 32 and cfg.rope_theta == 1e6
    del raw["rope_parameters"]
    assert MiniMaxM2Config.from_dict(raw).rotary_dim == 128  # no partial rotary declared: the full head


def test_token_ids_from_generation_config_first(tmp_path):
    raw = m2_config(bos_token_id=1, eos_token_id=2, dtype="bfloat16", max_position_embeddings=204800)  # M2.7 style
    raw.pop("torch_dtype")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert MiniMaxM2Config.from_folder(tmp_path).bos_token_id == 1
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 200019, "eos_token_id": 200020}))
    cfg = MiniMaxM2Config.from_folder(tmp_path)
    assert (cfg.bos_token_id, cfg.eos_token_id) == (200019, 200020)
    assert cfg.max_position_embeddings == 204800 and cfg.torch_dtype == "bfloat16"


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "unknown architecture"),
        ({"qk_norm_type": "per_head"}, "qk_norm_type"),
        ({"scoring_func": "softmax"}, "scoring_func"),
        ({"shared_intermediate_size": 1024}, "shared experts"),
        ({"num_key_value_heads": 7}, "num_key_value_heads"),
    ],
)
def test_unsupported_configs_are_refused(change, needle):
    with pytest.raises(QuantkitError, match=needle):
        MiniMaxM2Config.from_dict(m2_config(**change))


def test_missing_key_is_named():
    raw = m2_config()
    del raw["hidden_size"]
    with pytest.raises(QuantkitError, match="hidden_size"):
        MiniMaxM2Config.from_dict(raw)


def test_mtp_layers_are_skipped_with_a_warning():
    cfg = MiniMaxM2Config.from_dict(m2_config())
    names = ["model.layers.61.input_layernorm.weight", "model.layers.62.input_layernorm.weight",
             "model.layers.64.self_attn.q_proj.weight", "model.norm.weight"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept = warn_extra_layers(cfg, names)
    assert kept == ["model.layers.61.input_layernorm.weight", "model.norm.weight"]
    assert len(caught) == 1 and "[62, 64]" in str(caught[0].message)


def test_tp8_is_invalid_for_block_fp8_experts_and_says_use_ep():
    cfg = MiniMaxM2Config.from_dict(m2_config())
    with pytest.raises(QuantkitError, match=r"1536/8 = 192.*expert parallelism"):
        check_parallel(cfg, "fp8-block", tp=8)
    check_parallel(cfg, "fp8-block", tp=8, ep=8)  # attention TP=8, experts EP=8
    check_parallel(cfg, "fp8-block", tp=4)  # 384 = 3 x 128
    check_parallel(cfg, "bf16", tp=8)
    with pytest.raises(QuantkitError, match="256"):
        check_parallel(cfg, "gguf-kquant", tp=4)  # 384 is not a multiple of 256
    with pytest.raises(QuantkitError, match="must divide num_key_value_heads"):
        check_parallel(cfg, "bf16", tp=16)
    with pytest.raises(QuantkitError, match="must divide num_local_experts"):
        check_parallel(cfg, "bf16", ep=3)
    with pytest.raises(QuantkitError, match="unknown format"):
        check_parallel(cfg, "int3", tp=1)
    degrees = valid_degrees(cfg, "fp8-block")
    assert (4, 1) in degrees and (8, 8) in degrees and (8, 1) not in degrees and (8, 2) in degrees
