"""BloomConfig: config.json in and out, aliases, validation, interop with transformers, presets."""

from __future__ import annotations

import json
import re

import pytest
import transformers

from bloom_jax import BloomConfig, BloomJaxError, abstract_params, count_params, load_config, make_model, preset_names

# Compared between our config and transformers' (every architecture field both define).
SHARED_FIELDS = (
    "vocab_size", "hidden_size", "n_layer", "n_head", "layer_norm_epsilon", "initializer_range",
    "apply_residual_connection_post_layernorm", "hidden_dropout", "attention_dropout", "pretraining_tp",
    "slow_but_exact", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings",
)
# Every field set away from its default, so a field that is dropped or renamed on the way shows.
NON_DEFAULT = dict(
    vocab_size=100, hidden_size=48, n_layer=3, n_head=6, layer_norm_epsilon=1e-6, initializer_range=0.01,
    apply_residual_connection_post_layernorm=True, hidden_dropout=0.1, attention_dropout=0.2, pretraining_tp=2,
    slow_but_exact=True, seq_length=128, bos_token_id=5, eos_token_id=6, pad_token_id=7, unk_token_id=8,
)
UNKNOWN_KEYS = {"offset_alibi": 100, "skip_bias_add": True}
ALIASES = [("n_embed", "hidden_size", 96), ("num_attention_heads", "n_head", 16), ("num_hidden_layers", "n_layer", 5)]
RELEASED = {  # name: (hidden, layers, heads, published parameter count)
    "bloom-560m": (1024, 24, 16, 559_214_592),
    "bloom-1b1": (1536, 24, 16, 1_065_314_304),
    "bloom-1b7": (2048, 24, 16, 1_722_408_960),
    "bloom-3b": (2560, 30, 32, 3_002_557_440),
    "bloom-7b1": (4096, 30, 32, 7_069_016_064),
    "bloom-176b": (14336, 70, 112, 176_247_271_424),
}


def test_dict_round_trip():
    config = BloomConfig(**NON_DEFAULT, extra=UNKNOWN_KEYS)
    data = config.to_dict()
    assert data["model_type"] == "bloom"
    assert {k: data[k] for k in NON_DEFAULT} == NON_DEFAULT
    back = BloomConfig.from_dict(data)
    assert back == config
    assert back.to_dict() == data


def test_eos_list_round_trip():
    config = BloomConfig.from_dict({"eos_token_id": [2, 9]})
    assert config.eos_token_id == (2, 9)
    assert config.to_dict()["eos_token_id"] == [2, 9]


@pytest.mark.parametrize("alias, canonical, value", ALIASES)
def test_alias_is_read(alias, canonical, value):
    config = BloomConfig.from_dict({alias: value})
    assert getattr(config, canonical) == value
    data = config.to_dict()
    assert data[canonical] == value and alias not in data


def test_all_aliases_together():
    config = BloomConfig.from_dict({alias: value for alias, _, value in ALIASES})
    assert (config.hidden_size, config.n_head, config.n_layer) == (96, 16, 5)


@pytest.mark.parametrize("alias, canonical, value", ALIASES)
def test_alias_agreeing_with_canonical_is_accepted(alias, canonical, value):
    assert getattr(BloomConfig.from_dict({alias: value, canonical: value}), canonical) == value


@pytest.mark.parametrize("alias, canonical, value", ALIASES)
def test_alias_conflicting_with_canonical_is_an_error(alias, canonical, value):
    with pytest.raises(BloomJaxError, match=rf"{alias}.*{canonical}"):
        BloomConfig.from_dict({alias: value, canonical: value * 2})


def test_unknown_keys_survive_to_json(tmp_path):
    BloomConfig.from_dict({"hidden_size": 48, "n_head": 6, **UNKNOWN_KEYS}).to_json(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert {k: written[k] for k in UNKNOWN_KEYS} == UNKNOWN_KEYS
    assert BloomConfig.from_json(tmp_path).extra == {**UNKNOWN_KEYS, "architectures": ["BloomForCausalLM"],
                                                     "model_type": "bloom"}


@pytest.mark.parametrize("data, message", [
    pytest.param({"hidden_size": 50, "n_head": 8}, "hidden_size (50) must be divisible by n_head (8)",
                 id="not_divisible"),
    pytest.param({"hidden_size": 0}, "hidden_size must be a positive integer", id="zero_hidden"),
    pytest.param({"n_head": -2}, "n_head must be a positive integer", id="negative_heads"),
    pytest.param({"n_layer": 0}, "n_layer must be a positive integer", id="zero_layers"),
    pytest.param({"vocab_size": -1}, "vocab_size must be a positive integer", id="negative_vocab"),
    pytest.param({"hidden_dropout": 1.0}, "hidden_dropout must be in [0, 1)", id="dropout_one"),
    pytest.param({"attention_dropout": -0.1}, "attention_dropout must be in [0, 1)", id="dropout_negative"),
    pytest.param({"model_type": "gpt2"}, "model_type is 'gpt2', not 'bloom'", id="not_bloom"),
    pytest.param({"tie_word_embeddings": False}, "tie_word_embeddings=false", id="untied_head"),
])
def test_invalid_config_is_an_error(data, message):
    with pytest.raises(BloomJaxError, match=re.escape(message)):
        BloomConfig.from_dict(data)


def test_invalid_json_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"hidden_size": 64,')
    with pytest.raises(BloomJaxError, match=rf"{re.escape(str(path))} is not valid JSON"):
        BloomConfig.from_json(path)


@pytest.mark.parametrize("name", ["missing.json", "."], ids=["file", "directory_without_config"])
def test_missing_file(tmp_path, name):
    with pytest.raises(BloomJaxError, match="no such file: .*json"):
        BloomConfig.from_json(tmp_path / name)


def test_our_config_loads_in_transformers(tmp_path):
    BloomConfig(**NON_DEFAULT, extra=UNKNOWN_KEYS).to_json(tmp_path)
    theirs = transformers.BloomConfig.from_pretrained(tmp_path)
    assert {f: getattr(theirs, f) for f in SHARED_FIELDS} == {f: NON_DEFAULT.get(f, True) for f in SHARED_FIELDS}
    assert (theirs.num_hidden_layers, theirs.num_attention_heads) == (3, 6)


def test_transformers_config_loads_here(tmp_path):
    kwargs = {f: NON_DEFAULT[f] for f in SHARED_FIELDS if f in NON_DEFAULT}
    transformers.BloomConfig(**kwargs).save_pretrained(tmp_path)
    ours = BloomConfig.from_json(tmp_path)
    assert {f: getattr(ours, f) for f in SHARED_FIELDS} == {**kwargs, "tie_word_embeddings": True}


def test_preset_names():
    names = set(preset_names())
    assert set(RELEASED) <= names
    assert {"bloom-tiny", "bloom-tiny-6h"} <= names


@pytest.mark.parametrize("name", RELEASED)
def test_released_preset(name):
    hidden, layers, heads, published = RELEASED[name]
    config = load_config(name)
    assert (config.hidden_size, config.n_layer, config.n_head, config.vocab_size) == (hidden, layers, heads, 250880)
    assert config.num_params == published
    # abstract_params traces `init` with jax.eval_shape: shapes only, nothing allocated.
    assert count_params(abstract_params(make_model(config))) == published
