"""The converted format's one owner: `save_pretrained` writes what `convert` writes, Orbax reads it as its own,
and `from_pretrained` and `export` take it back."""

from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax.traverse_util import flatten_dict
from reference import assert_parity, hf_logits

from bloom_jax import BloomJaxError, from_pretrained, save_pretrained
from bloom_jax.checkpoints import convert, export, is_converted, read_tokenizer
from bloom_jax.model import unstack_layers
from bloom_jax.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["BLOOM parle français, English, 日本語 et plus."] * 20, vocab_size=300)


def leaves(params) -> dict:
    return {path: np.asarray(value) for path, value in flatten_dict(params).items()}


@pytest.mark.parametrize("layout", ["scanned", "unrolled"])
def test_save_pretrained_round_trips_bit_for_bit(tiny, tokenizer, tmp_path, layout):
    params = tiny.params if layout == "scanned" else unstack_layers(tiny.params)
    save_pretrained(params, tiny.config, tmp_path / "ckpt", tokenizer)
    assert is_converted(tmp_path / "ckpt") and not list(tmp_path.glob(".*partial*"))  # staged, then renamed
    model, restored = from_pretrained(tmp_path / "ckpt")
    assert model.config == tiny.config
    expected, got = leaves(tiny.params), leaves(restored)
    assert expected.keys() == got.keys()
    for path in expected:
        np.testing.assert_array_equal(got[path], expected[path], err_msg=str(path))
    assert read_tokenizer(tmp_path / "ckpt").encode("français") == tokenizer.encode("français")
    # Orbax restores it as any checkpoint of its own.
    plain = ocp.StandardCheckpointer().restore((tmp_path / "ckpt" / "params").absolute())
    np.testing.assert_array_equal(np.asarray(plain["ln_f"]["bias"]), expected[("ln_f", "bias")])


def test_save_pretrained_warns_about_nothing(tiny, tmp_path, caplog):
    # Orbax's note that there were no OCDBT files to merge (there are none in this format, by design) stays off
    # stderr; any other warning of Orbax's still shows.
    with caplog.at_level(logging.WARNING):
        save_pretrained(tiny.params, tiny.config, tmp_path / "ckpt")
        logging.getLogger("absl").warning("Skipping a different thing")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == ["Skipping a different thing"]


def test_save_pretrained_keeps_the_dtype_and_refuses_a_non_empty_destination(tiny, tmp_path):
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), tiny.params)
    save_pretrained(params, tiny.config, tmp_path / "bf16")
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    model, restored = from_pretrained(tmp_path / "bf16", dtype="bfloat16")
    assert {a.dtype for a in jax.tree.leaves(restored)} == {jnp.dtype(jnp.bfloat16)}
    with pytest.raises(BloomJaxError, match="is not empty"):
        save_pretrained(params, tiny.config, tmp_path / "bf16")
    save_pretrained(tiny.params, tiny.config, tmp_path / "bf16", overwrite=True)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "float32"


def test_a_saved_checkpoint_exports_to_transformers(tiny, tmp_path):
    import transformers

    save_pretrained(tiny.params, tiny.config, tmp_path / "ckpt")
    export(tmp_path / "ckpt", tmp_path / "hf", progress=False)
    torch_model = transformers.BloomForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert_parity(hf_logits(torch_model, tiny.ids, tiny.mask), tiny.ref, tiny.mask, rtol=1e-6)


def test_convert_writes_the_metadata_orbax_writes(tiny, tmp_path):
    """Our streaming writer and Orbax's own, on the same parameters: the same `_METADATA`, so a checkpoint
    `convert` wrote is one Orbax reads (a new Orbax that changes its format fails here first)."""
    convert(tiny.checkpoint.directory, tmp_path / "converted", progress=False)
    save_pretrained(tiny.params, tiny.config, tmp_path / "saved")
    ours, orbax = (json.loads((tmp_path / name / "params" / "_METADATA").read_text()) for name in ("converted",
                                                                                                   "saved"))
    assert ours == orbax
    # The arrays: zarr without compression in both, one directory per parameter.
    for name in ("converted", "saved"):
        zarray = json.loads((tmp_path / name / "params" / "ln_f.bias" / ".zarray").read_text())
        assert zarray["compressor"] is None and zarray["shape"] == [tiny.config.hidden_size]
    # No private Orbax class path in what we write (Orbax's own names its handler's `_src` module there).
    assert "item_handlers" not in json.loads((tmp_path / "converted" / "params" / "_CHECKPOINT_METADATA").read_text())
