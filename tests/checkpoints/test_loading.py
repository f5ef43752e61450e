"""Every Hugging Face checkpoint layout loads with parity-bar logits; every broken checkpoint is a clear error."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
import torch
from commands import error_line, run_cli
from opened import OPENED
from reference import (
    HEAD,
    LAYOUTS,
    PREFIX,
    assert_parity,
    config_says,
    delete_second_shard,
    hf_logits,
    jax_logits,
    save_config,
    stored_names,
    truncate,
    with_tensor,
    without_tensor,
    write_bin,
    write_bin_sharded,
    write_malicious_bin,
    write_safetensors,
    write_safetensors_sharded,
)

from bloom_jax import BloomJaxError
from bloom_jax.checkpoints import convert, from_pretrained


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_loads_with_parity(tiny, tmp_path, layout):
    spec = LAYOUTS[layout]
    spec.write(tiny.checkpoint.torch_model, tmp_path)
    # The directory holds what the layout says, so its parity proves the loader reads that layout.
    files, names = stored_names(tmp_path)
    assert len(files) >= spec.min_files and all(re.fullmatch(spec.files, f) for f in files), files
    assert (HEAD in names) == spec.lm_head
    assert {name.startswith(PREFIX) for name in names - {HEAD}} == {spec.prefixed}
    model, params = from_pretrained(tmp_path)
    assert_parity(jax_logits(model, params, tiny.ids, tiny.mask), tiny.ref, tiny.mask)


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
@pytest.mark.parametrize("storage", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_checkpoint(tiny, tmp_path, layout, storage):
    """Hub checkpoints are stored in fp16 (bloom-560m ... 7b1) or bf16 (bloom): they load exactly, as float32."""
    stored = copy.deepcopy(tiny.checkpoint.torch_model).to(storage)
    LAYOUTS[layout].write(stored, tmp_path)
    model, params = from_pretrained(tmp_path)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    upcast = stored.float()  # the same rounded weights, computed in fp32 by PyTorch
    assert_parity(jax_logits(model, params, tiny.ids, tiny.mask), hf_logits(upcast, tiny.ids, tiny.mask), tiny.mask)


# -- broken checkpoints ---------------------------------------------------------------------------------------------
T = re.escape(PREFIX)  # tensor names in messages are as stored, with the prefix
# name: (writer of a good checkpoint, damage done to it, regexes the error message must all match, "{dir}" standing
# for the checkpoint directory). They ask for names (tensor, file, path) and key words, not for exact wording.
BROKEN: dict[str, tuple[Callable, Callable, list[str]]] = {
    "missing_tensor": (
        write_safetensors, without_tensor("h.1.mlp.dense_4h_to_h.bias"),
        [r"missing", r"h\.1\.mlp\.dense_4h_to_h\.bias"]),
    "unexpected_tensor": (
        write_safetensors, with_tensor("h.0.self_attention.rotary", 4),
        [r"unexpected", rf"{T}h\.0\.self_attention\.rotary\b", r"model\.safetensors"]),
    "extra_layer": (
        write_safetensors, with_tensor("h.2.input_layernorm.weight", 64),  # a third layer in a 2-layer model
        [r"unexpected", rf"{T}h\.2\.input_layernorm\.weight", r"model\.safetensors"]),
    "wrong_vocab": (
        write_safetensors, config_says(vocab_size=600),
        [rf"{T}word_embeddings\.weight", r"model\.safetensors", r"512, 64", r"600, 64"]),
    "wrong_hidden_size": (
        write_safetensors, config_says(hidden_size=32),
        [rf"{T}(h\.\d+\.)?[\w.]+\.(weight|bias)", r"model\.safetensors", r"shape"]),
    "missing_shard": (
        write_safetensors_sharded, delete_second_shard,
        [r"model-00002-of-\d{5}\.safetensors", r"model\.safetensors\.index\.json"]),
    "truncated_safetensors": (write_safetensors, truncate("model.safetensors"), [r"model\.safetensors"]),
    "truncated_bin": (write_bin, truncate("pytorch_model.bin"), [r"pytorch_model\.bin"]),
    "no_checkpoint": (save_config, lambda d: None, [r"no checkpoint", "{dir}"]),
    "no_config": (write_safetensors, lambda d: (d / "config.json").unlink(), [r"config\.json"]),
    "nonexistent_path": (write_safetensors, shutil.rmtree, [r"no such directory", "{dir}"]),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_checkpoint_is_a_clear_error(tiny, tmp_path, case):
    write, damage, patterns = BROKEN[case]
    d = tmp_path / "model"
    d.mkdir()
    write(tiny.checkpoint.torch_model, d)
    damage(d)
    with pytest.raises(BloomJaxError) as raised:
        from_pretrained(d)
    message = str(raised.value)
    for pattern in patterns:
        assert re.search(pattern.replace("{dir}", re.escape(str(d))), message), (pattern, message)


@pytest.mark.parametrize("argument", ["dtype", "param_dtype"])
@pytest.mark.parametrize("name", ["int8", "float64", "fp16"])
def test_unsupported_dtype(tiny, argument, name):
    with pytest.raises(BloomJaxError, match=rf"unsupported dtype.*{name}"):
        from_pretrained(tiny.checkpoint.directory, **{argument: name})


@pytest.mark.parametrize("legacy", [False, True], ids=["zip_format", "legacy_format"])
def test_malicious_pickle_does_not_run(tiny, tmp_path, legacy):
    d, marker = tmp_path / "model", tmp_path / "MARKER"
    d.mkdir()
    write_malicious_bin(tiny.checkpoint.torch_model, d, marker, legacy)
    with pytest.raises(BloomJaxError, match=r"pytorch_model\.bin"):
        from_pretrained(d)
    assert not marker.exists()
    # The payload is live: an unsafe load does run it (so the check above is not vacuous).
    torch.load(d / "pytorch_model.bin", weights_only=False)
    assert marker.exists()


# -- indexes that name files outside the checkpoint ------------------------------------------------------------------
# An index's weight_map may name only files inside its directory: whatever else it names, loading and converting
# stop at one line naming the index, the entry and the tensor, and the file outside (a secret, here a copy of a
# real shard, so that reading it would load) is never opened.
@pytest.fixture
def opened() -> list[str]:
    """The paths this process opens while the test runs."""
    with OPENED as paths:
        yield paths


INDEXES = {"safetensors": (write_safetensors_sharded, "model.safetensors.index.json"),
           "bin": (write_bin_sharded, "pytorch_model.bin.index.json")}
# name: the entry given to one tensor, from (the checkpoint directory, its first shard's name, the secret outside).
# `sub` is a folder of the checkpoint; `linked` a link to the folder above it.
HOSTILE: dict[str, Callable[[Path, str, Path], object]] = {
    "parent": lambda d, shard, secret: f"../{secret.name}",
    "out_of_a_subfolder": lambda d, shard, secret: f"sub/../../{secret.name}",
    "out_and_back_in": lambda d, shard, secret: f"../{d.name}/{shard}",
    "through_a_dot_dot_that_comes_back": lambda d, shard, secret: f"sub/../{shard}",
    "absolute": lambda d, shard, secret: str(secret),
    "file_url": lambda d, shard, secret: f"file://{secret}",
    "gs_url": lambda d, shard, secret: f"gs://bucket/{secret.name}",
    "backslashes": lambda d, shard, secret: f"..\\{secret.name}",
    "windows_drive": lambda d, shard, secret: f"C:{secret.name}",
    "empty": lambda d, shard, secret: "",
    "a_number": lambda d, shard, secret: 7,
    "null": lambda d, shard, secret: None,
    "nul_byte": lambda d, shard, secret: f"{shard}\x00",
    "link_out": lambda d, shard, secret: shard,  # the shard itself replaced by a link to the secret
    "through_a_linked_folder": lambda d, shard, secret: f"linked/{secret.name}",
}


def hostile_checkpoint(torch_model, tmp_path: Path, layout: str, case: str) -> tuple[Path, str, str, object]:
    """A sharded checkpoint `tmp_path/model` whose index gives its first tensor the entry `HOSTILE[case]`, and a
    secret beside it (a copy of that tensor's shard). Returns (directory, index name, tensor, entry)."""
    write, index_name = INDEXES[layout]
    d = tmp_path / "model"
    (d / "sub").mkdir(parents=True)
    write(torch_model, d)
    (d / "linked").symlink_to(tmp_path, target_is_directory=True)
    index = json.loads((d / index_name).read_text())
    tensor, shard = next(iter(index["weight_map"].items()))
    secret = tmp_path / f"secret{Path(shard).suffix}"
    shutil.copy(d / shard, secret)
    entry = HOSTILE[case](d, shard, secret)
    if case == "link_out":
        (d / shard).unlink()
        (d / shard).symlink_to(secret)
    index["weight_map"][tensor] = entry
    (d / index_name).write_text(json.dumps(index))
    return d, index_name, tensor, entry


@pytest.mark.parametrize("case", HOSTILE)
@pytest.mark.parametrize("layout", INDEXES)
def test_an_index_naming_a_file_outside_is_one_line_and_opens_nothing_outside(tiny, tmp_path, opened, layout,
                                                                               case):
    d, index_name, tensor, entry = hostile_checkpoint(tiny.checkpoint.torch_model, tmp_path, layout, case)
    opened.clear()  # what writing the checkpoint and its secret opened
    expected = (f"{index_name} names {entry!r} for tensor {tensor!r}: a shard must be a file inside the checkpoint "
                "directory")
    if case in ("link_out", "through_a_linked_folder"):
        expected += f" (it links to {(tmp_path / 'secret').resolve()}{Path(str(entry)).suffix})"
    with pytest.raises(BloomJaxError) as raised:
        from_pretrained(d)
    assert str(raised.value) == expected
    with pytest.raises(BloomJaxError) as raised:
        convert(d, tmp_path / "converted", progress=False)
    assert str(raised.value) == expected
    code, out, err = run_cli("convert", d, tmp_path / "converted")
    assert code == 2 and error_line(err) == f"bloom-jax: error: {expected}"
    assert not (tmp_path / "converted").exists()
    assert [path for path in opened if "secret" in path] == []
    assert any(path.startswith(str(d)) for path in opened)  # the recording is live: the index was opened


def test_an_index_may_name_shards_in_a_subfolder(tiny, tmp_path):
    d = tmp_path / "model"
    write_safetensors_sharded(tiny.checkpoint.torch_model, d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    (d / "weights").mkdir()
    for shard in set(index["weight_map"].values()):
        (d / shard).rename(d / "weights" / shard)
    index["weight_map"] = {name: f"weights/{shard}" for name, shard in index["weight_map"].items()}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    model, params = from_pretrained(d)
    assert_parity(jax_logits(model, params, tiny.ids, tiny.mask), tiny.ref, tiny.mask)


def test_a_hub_snapshot_of_links_into_its_blobs_loads_and_no_link_leaves_them(tiny, tmp_path):
    # huggingface_hub's cache: each file of models--ORG--NAME/snapshots/REVISION a link to ../../blobs/HASH.
    repo = tmp_path / "hub" / "models--bloom-jax--tiny"
    snapshot, blobs = repo / "snapshots" / ("0" * 40), repo / "blobs"
    write_safetensors_sharded(tiny.checkpoint.torch_model, tmp_path / "saved")
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for k, path in enumerate(sorted((tmp_path / "saved").iterdir())):
        path.rename(blobs / f"{k:064x}")
        (snapshot / path.name).symlink_to(f"../../blobs/{k:064x}")
    model, params = from_pretrained(snapshot)
    assert_parity(jax_logits(model, params, tiny.ids, tiny.mask), tiny.ref, tiny.mask)
    # A link beside them that leaves the repository is refused all the same.
    shard = sorted(snapshot.glob("model-*.safetensors"))[0]
    shutil.copy(shard, tmp_path / "secret.safetensors")
    shard.unlink()
    shard.symlink_to(tmp_path / "secret.safetensors")
    with pytest.raises(BloomJaxError, match=rf"names '{shard.name}' for tensor .*: a shard must be a file inside the "
                                            rf"checkpoint directory \(it links to .*secret\.safetensors\)$"):
        from_pretrained(snapshot)


def test_a_hub_id_loads_from_the_hub_cache_resolved_once(tiny, tmp_path):
    # A hub cache as huggingface_hub keeps it (refs/main -> a snapshot), read offline by snapshot_download itself,
    # in a fresh process so that HF_HOME applies. One resolution per load: online, each one asks the hub.
    import json
    import subprocess

    import numpy as np

    revision = "0" * 40
    cached = tmp_path / "hf-home" / "hub" / "models--bloom-jax--tiny"
    (cached / "refs").mkdir(parents=True)
    (cached / "refs" / "main").write_text(revision)
    shutil.copytree(tiny.checkpoint.directory, cached / "snapshots" / revision)
    (cached / "snapshots" / revision / "generation_config.json").write_text('{"max_new_tokens": 7}')
    code = """if True:
        import json, sys
        import huggingface_hub
        calls = []
        real = huggingface_hub.snapshot_download
        huggingface_hub.snapshot_download = lambda *a, **k: calls.append(a[0]) or real(*a, **k)
        import numpy as np
        from bloom_jax import Generator, from_pretrained
        model, params = from_pretrained("bloom-jax/tiny")
        ids = np.load(sys.argv[1])
        logits = np.asarray(model.apply({"params": params}, ids))
        after_load = list(calls)
        generator = Generator.from_pretrained("bloom-jax/tiny")
        np.save(sys.argv[2], logits)
        print(json.dumps([after_load, calls[len(after_load):], generator.defaults.max_new_tokens]))
    """
    ids = np.asarray(tiny.ids[:1])  # the longest prompt: no padding
    np.save(tmp_path / "ids.npy", ids)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ids.npy"), str(tmp_path / "logits.npy")],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == [["bloom-jax/tiny"], ["bloom-jax/tiny"], 7]
    assert_parity(np.load(tmp_path / "logits.npy"), hf_logits(tiny.checkpoint.torch_model, ids))
