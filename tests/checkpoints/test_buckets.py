"""Checkpoints in a bucket (a real GCS server: tests/helpers/gcs.py): `convert`, `save_pretrained` and `export`
write gs:// URLs; `from_pretrained` restores them onto a mesh, each device its shards; what a killed or failed
write leaves never loads; a missing bucket, a denied write, a server that keeps failing and an index that names a
file outside its directory are one line."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from commands import error_line, run_cli
from faults import cli, kill, stopped
from flax.traverse_util import flatten_dict
from gcs import Rule, requests_to
from opened import OPENED
from reference import assert_parity

from bloom_jax import BloomJaxError, from_pretrained, save_pretrained, storage
from bloom_jax.checkpoints import convert, export, is_converted
from bloom_jax.sharding import make_mesh, sharded_forward


def leaves(params) -> dict:
    return {path: np.asarray(value) for path, value in flatten_dict(params).items()}


def test_convert_to_a_bucket_then_restore_on_a_2x4_mesh(tiny, bucket, tmp_path):
    url = storage.join(bucket, "ckpt")
    convert(tiny.checkpoint.directory, url, progress=False)
    assert is_converted(url) and storage.is_file(storage.join(url, "params", "commit_success.txt"))
    mesh = make_mesh("data=2,tensor=4")
    model, params = from_pretrained(url, mesh=mesh, rules="fsdp_tensor")
    # Each device holds its own shard, as read from the bucket: a tensor-sharded kernel is split 4 ways.
    qkv = params["h"]["self_attention"]["query_key_value"]["kernel"]
    assert len({str(shard.index) for shard in qkv.addressable_shards}) == 4
    for path, value in leaves(tiny.params).items():
        np.testing.assert_array_equal(leaves(params)[path], value, err_msg=str(path))
    logits = sharded_forward(model, mesh, "fsdp_tensor")(params, tiny.ids, tiny.mask)
    assert_parity(np.asarray(logits), tiny.ref, tiny.mask)


def test_save_pretrained_and_export_to_a_bucket_equal_their_local_files(tiny, bucket, tmp_path):
    url = storage.join(bucket, "saved")
    save_pretrained(tiny.params, tiny.config, url)
    _, restored = from_pretrained(url)
    for path, value in leaves(tiny.params).items():
        np.testing.assert_array_equal(leaves(restored)[path], value, err_msg=str(path))
    with pytest.raises(BloomJaxError, match="is not empty"):
        save_pretrained(tiny.params, tiny.config, url)

    export(url, storage.join(bucket, "hf"), max_shard_size="20KB", progress=False)  # shards, and their index
    export(url, tmp_path / "hf", max_shard_size="20KB", progress=False)
    local = {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}
    assert len([name for name in local if name.endswith(".safetensors")]) > 1
    assert {name: storage.read_bytes(storage.join(bucket, "hf", name)) for name in local} == local
    assert storage.list_names(storage.join(bucket, "hf")) == sorted(local)


def test_generate_from_a_bucket_equals_generate_from_a_directory(tiny, bucket, tmp_path):
    from bloom_jax.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(["BLOOM parle français, English et plus."] * 20, 300)
    places = [tmp_path / "ckpt", storage.join(bucket, "ckpt")]
    for place in places:
        save_pretrained(tiny.params, tiny.config, place, tokenizer)
    prompts = storage.join(bucket, "prompts.txt")  # a prompts file may live in the bucket too
    storage.write_bytes(prompts, "BLOOM parle\nEnglish et\n".encode())
    results = [run_cli("generate", place, "--prompts-file", prompts, "--max-new-tokens", 6, "--json")
               for place in places]
    assert [code for code, _, _ in results] == [0, 0], results[1][2]
    assert results[0][1] == results[1][1] and results[0][1].count('"completion_ids": [') == 2


def test_a_hugging_face_directory_in_a_bucket_loads_and_converts_through_a_local_mirror(tiny, bucket, tmp_path,
                                                                                        monkeypatch):
    monkeypatch.setenv("BLOOM_JAX_CACHE", str(tmp_path / "cache"))
    source = tiny.checkpoint.directory
    url = storage.join(bucket, "hf")
    for path in source.iterdir():
        storage.write_bytes(storage.join(url, path.name), path.read_bytes())
    _, params = from_pretrained(url)
    for path, value in leaves(tiny.params).items():
        np.testing.assert_array_equal(leaves(params)[path], value, err_msg=str(path))
    mirrored = tmp_path / "cache" / "buckets" / url.split("://", 1)[1]
    assert sorted(p.name for p in mirrored.iterdir() if not p.name.startswith(".")) == sorted(
        p.name for p in source.iterdir())
    fetched = {p.name: p.stat().st_mtime_ns for p in mirrored.iterdir()}
    code, out, err = run_cli("convert", url, storage.join(bucket, "converted"))  # the mirror is up to date
    assert code == 0 and "fetching" not in err, err
    assert {p.name: p.stat().st_mtime_ns for p in mirrored.iterdir()} == fetched
    _, converted = from_pretrained(storage.join(bucket, "converted"))
    np.testing.assert_array_equal(np.asarray(converted["ln_f"]["bias"]), np.asarray(tiny.params["ln_f"]["bias"]))


def test_an_index_in_a_bucket_naming_a_file_outside_is_one_line_and_reaches_nothing_outside(tiny, gcs, bucket,
                                                                                             tmp_path, monkeypatch):
    # The mirror fetches the files the directory lists (never the index's names), then reads the index as a local
    # one: whether an entry leaves the directory in the bucket or the mirror's, it is refused before any file
    # outside is read, fetched or written. Secrets (copies of a real shard) wait beside both.
    monkeypatch.setenv("BLOOM_JAX_CACHE", str(tmp_path / "cache"))
    url = storage.join(bucket, "hf")
    mirrored = tmp_path / "cache" / "buckets" / url.split("://", 1)[1]
    saved = tmp_path / "saved"
    tiny.checkpoint.torch_model.save_pretrained(saved, max_shard_size="300KB")  # two shards and their index
    index = json.loads((saved / "model.safetensors.index.json").read_text())
    tensor, shard = next(iter(index["weight_map"].items()))
    for path in saved.iterdir():
        storage.write_bytes(storage.join(url, path.name), path.read_bytes())
    storage.write_bytes(storage.join(bucket, "secret.safetensors"), (saved / shard).read_bytes())
    mirrored.parent.mkdir(parents=True)
    shutil.copy(saved / shard, mirrored.parent / "secret.safetensors")
    for k, entry in enumerate(["../secret.safetensors", "sub/../../secret.safetensors", f"{bucket}/secret.safetensors",
                               str(mirrored.parent / "secret.safetensors"), "..\\secret.safetensors"]):
        index["weight_map"][tensor] = entry
        storage.write_bytes(storage.join(url, "model.safetensors.index.json"), json.dumps(index).encode())
        in_bucket, requests = storage.find(bucket), len(gcs.proxy.seen)
        expected = (f"model.safetensors.index.json names {entry!r} for tensor {tensor!r}: a shard must be a file "
                    "inside the checkpoint directory")
        with OPENED as opened:
            if k == 0:  # the library as the command: the same line
                with pytest.raises(BloomJaxError) as raised:
                    from_pretrained(url)
                assert str(raised.value) == expected
            code, out, err = run_cli("convert", url, storage.join(bucket, "converted"))  # after its fetching log
            assert code == 2 and "Traceback" not in err and err.strip().splitlines()[-1] == (
                f"bloom-jax: error: {expected}"), err
        assert [path for path in opened if "secret" in path] == [], entry
        assert any(path.startswith(str(mirrored)) for path in opened), entry  # the recording is live
        assert [path for _, path, _ in gcs.proxy.seen[requests:] if "secret" in path] == [], entry
        assert storage.find(bucket) == in_bucket, entry  # nothing written in the bucket
        outside = [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and not p.is_relative_to(mirrored)]
        assert outside == [mirrored.parent / "secret.safetensors"], entry  # the mirror wrote in its directory only
        assert sorted(p.name for p in mirrored.iterdir() if not p.name.startswith(".")) == sorted(
            p.name for p in saved.iterdir()), entry


@pytest.mark.slow  # a child process, killed, and three commands after it
def test_a_killed_convert_leaves_nothing_that_loads(tiny, bucket, tmp_path):
    url = storage.join(bucket, "ckpt")
    kill(stopped(tmp_path, 5, "bloom_jax.checkpoints.converted:OrbaxParamsWriter.write", "convert",
                 str(tiny.checkpoint.directory), url))
    assert storage.find(url) and not is_converted(url)  # some arrays were written, not the metadata
    code, out, err = run_cli("generate", url, "--prompt", "x")
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"bloom-jax: error: {url} is neither a converted checkpoint (no params/_METADATA) nor a Hugging Face "
        "directory (no config.json)")
    code, out, err = run_cli("convert", tiny.checkpoint.directory, url)
    assert code == 2 and error_line(err) == f"bloom-jax: error: {url} is not empty (use --overwrite to replace it)"
    code, out, err = run_cli("convert", tiny.checkpoint.directory, url, "--overwrite")
    assert code == 0, err
    _, params = from_pretrained(url)
    np.testing.assert_array_equal(np.asarray(params["ln_f"]["bias"]), np.asarray(tiny.params["ln_f"]["bias"]))


def test_a_missing_bucket_and_a_denied_write_are_one_line(tiny, gcs, bucket, tmp_path):
    code, out, err = run_cli("convert", tiny.checkpoint.directory, "gs://no-such-bucket-here/ckpt")
    assert code == 2 and error_line(err) == ("bloom-jax: error: cannot write gs://no-such-bucket-here/ckpt: there "
                                             "is no bucket no-such-bucket-here")
    save_pretrained(tiny.params, tiny.config, tmp_path / "ckpt")
    gcs.proxy.add(Rule(requests_to("POST|PUT|PATCH|DELETE"), status=403))
    for command in (["convert", tiny.checkpoint.directory], ["export", tmp_path / "ckpt"]):
        code, out, err = run_cli(*command, storage.join(bucket, "out"))
        assert code == 2 and error_line(err) == (f"bloom-jax: error: cannot write {bucket}/out: permission "
                                                 "denied (HTTP 403)"), err
    assert storage.find(bucket) == []


@pytest.mark.slow  # the retries' backoff: about 33 s
def test_a_server_that_keeps_failing_mid_convert_is_one_line_and_nothing_loads(tiny, gcs, bucket, tmp_path):
    # The first few arrays land, then every write is answered 503: the retries give up, the command says where
    # and why, and what it wrote stays incomplete (removing it would meet the same server).
    url = storage.join(bucket, "ckpt")
    rule = gcs.proxy.add(Rule(requests_to("POST|PUT", "ckpt/params/h"), status=503))
    code, out, err = cli("convert", tiny.checkpoint.directory, url)
    assert code == 2 and out == "" and "Traceback" not in err, err[-3000:]
    assert re.fullmatch(re.escape(f"bloom-jax: error: cannot write {url}: the server answered 503 Service "
                                  "Unavailable to every try (6 tries, 1 s to 16 s apart); what was written is left there, "
                                  "incomplete (it does not load: write again with --overwrite)"),
                        err.strip().splitlines()[-1]), err[-2000:]
    assert rule.hits >= 6 and not is_converted(url)
    gcs.proxy.clear()
    code, out, err = run_cli("convert", tiny.checkpoint.directory, url, "--overwrite")
    assert code == 0, err
    restored = leaves(from_pretrained(url)[1])
    for path, value in leaves(tiny.params).items():
        np.testing.assert_array_equal(restored[path], value, err_msg=str(path))
