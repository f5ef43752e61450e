"""`convert` (Hugging Face -> Orbax) and `export` (Orbax -> Hugging Face safetensors): every source layout converts
with parity-bar logits, Orbax reads the result itself, export round-trips bit for bit, and a bad input or an
interrupted run leaves nothing loadable (and no staging directory) behind."""

from __future__ import annotations

import copy
import json
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers
from reference import (
    HEAD,
    LAYOUTS,
    PREFIX,
    assert_parity,
    config_says,
    delete_second_shard,
    hf_logits,
    jax_logits,
    relative_max_error,
    rewrite_safetensors,
    save_config,
    stored_tensors,
    truncate,
    without_tensor,
    write_malicious_bin,
    write_safetensors,
    write_safetensors_sharded,
)
from safetensors.numpy import load_file as load_numpy

from bloom_jax import BloomJaxError
from bloom_jax.checkpoints import hf, hf_files
from bloom_jax.checkpoints import TOKENIZER_FILES, OrbaxParamsWriter, convert, export, from_pretrained, is_converted
from bloom_jax.cli import main
from bloom_jax.config import BloomConfig

# Weights rounded to bfloat16 move the logits by ~0.5% of their largest magnitude here; 4x margin.
BF16_RTOL = 2e-2
# Tokenizer files as a source might hold them: non-ASCII text, and a file with Windows line endings. A copy must
# keep every byte.
TOKENIZER = {
    "tokenizer.json": '{"version": "1.0", "model": {"type": "BPE", "vocab": {"<unk>": 0, "Ġété": 1, "▁日本": 2}}}\n'
                      .encode(),
    "tokenizer_config.json": b'{\r\n  "tokenizer_class": "BloomTokenizerFast",\r\n  "padding_side": "left"\r\n}\r\n',
}
STAGING = ".*.partial-*"  # the staging directories a local conversion or export writes into


def write_tokenizer(directory: Path) -> None:
    for name, data in TOKENIZER.items():
        (directory / name).write_bytes(data)


def snapshot(directory: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and directory (None) under `directory`, by relative path."""
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None
            for p in sorted(directory.rglob("*"))}


def populate(directory: Path) -> dict[str, bytes | None]:
    """A non-empty directory that is not a checkpoint; returns its snapshot."""
    (directory / "sub").mkdir(parents=True)
    (directory / "notes.txt").write_bytes(b"keep me\n")
    (directory / "sub" / "data.bin").write_bytes(bytes(range(256)))
    return snapshot(directory)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def exported_tensors(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of an export's safetensors files (a name in two files is an error)."""
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        shard = load_numpy(path)
        assert not set(shard) & set(tensors), f"tensors in two files: {set(shard) & set(tensors)}"
        tensors.update(shard)
    return tensors


def assert_round_trip(source: dict[str, torch.Tensor], exported: dict[str, np.ndarray], config: BloomConfig) -> None:
    """Exported tensors are exactly the BLOOM tensors, `transformer.`-prefixed, each bit-identical to its source
    (the tied `lm_head.weight` to the embedding)."""
    assert set(exported) == {PREFIX + name for name in hf.hf_names(config)}
    for name, tensor in source.items():
        key = PREFIX + "word_embeddings.weight" if name == HEAD else PREFIX + hf.strip_prefix(name)
        assert same_bits(exported[key], to_numpy(tensor)), name


def transformers_model(directory: Path):
    return transformers.BloomForCausalLM.from_pretrained(directory).eval()


def params_equal(a, b) -> bool:
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def source(tiny, tmp_path_factory) -> Path:
    """The default tiny checkpoint (save_pretrained, safetensors) plus tokenizer files. Read-only."""
    directory = tmp_path_factory.mktemp("source") / "model"
    shutil.copytree(tiny.checkpoint.directory, directory)
    write_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory) -> Path:
    """`source` converted in float32. Read-only."""
    out = tmp_path_factory.mktemp("converted") / "out"
    convert(source, out, progress=False)
    return out


@pytest.fixture(scope="module")
def converted_bf16(source, tmp_path_factory) -> Path:
    """`source` converted with bfloat16 storage. Read-only."""
    out = tmp_path_factory.mktemp("converted_bf16") / "out"
    convert(source, out, dtype="bfloat16", progress=False)
    return out


@pytest.fixture(scope="module")
def rounded_bf16(tiny):
    """The reference model with its weights rounded to bfloat16 and computing in float32, and its logits."""
    model = copy.deepcopy(tiny.checkpoint.torch_model).to(torch.bfloat16).float()
    return model, hf_logits(model, tiny.ids, tiny.mask)


# -- every layout converts ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_converts_with_parity(tiny, tmp_path, layout):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    LAYOUTS[layout].write(tiny.checkpoint.torch_model, src)
    write_tokenizer(src)
    config = convert(src, out, progress=False)
    assert config == tiny.config
    copied = {name for name in TOKENIZER_FILES if (src / name).is_file()}
    assert set(TOKENIZER) <= copied
    assert {p.name for p in out.iterdir()} == {"config.json", "params"} | copied
    assert (out / "params" / "_METADATA").is_file() and is_converted(out)
    for name in copied:
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert BloomConfig.from_json(out / "config.json") == tiny.config
    assert not list(tmp_path.glob(STAGING))
    model, params = from_pretrained(out)
    assert_parity(jax_logits(model, params, tiny.ids, tiny.mask), tiny.ref, tiny.mask)


def test_orbax_standard_restore_reads_conversion(converted):
    restored = ocp.StandardCheckpointer().restore(str(converted / "params"))
    _, params = from_pretrained(converted)
    assert params_equal(restored, params)


# -- export ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["safetensors", "bin_bigscience", "no_prefix_with_lm_head"])
def test_convert_then_export_is_bit_identical(tiny, tmp_path, layout):
    src, out, exported = tmp_path / "src", tmp_path / "out", tmp_path / "exported"
    src.mkdir()
    LAYOUTS[layout].write(tiny.checkpoint.torch_model, src)
    convert(src, out, progress=False)
    assert export(out, exported, progress=False) == ["model.safetensors"]
    assert sorted(p.name for p in exported.glob("model*")) == ["model.safetensors"]  # no index for one file
    assert_round_trip(stored_tensors(src), exported_tensors(exported), tiny.config)
    assert not list(tmp_path.glob(STAGING))


def test_export_loads_in_transformers_with_identical_logits(tiny, converted, tmp_path):
    exported = tmp_path / "exported"
    export(converted, exported, dtype="float32", progress=False)
    assert np.array_equal(hf_logits(transformers_model(exported), tiny.ids, tiny.mask), tiny.ref)


def test_export_shards_above_max_shard_size(tiny, converted, tmp_path):
    exported = tmp_path / "exported"
    files = export(converted, exported, max_shard_size="100KB", progress=False)
    on_disk = sorted(p.name for p in exported.glob("*.safetensors"))
    assert files == on_disk and len(files) >= 3
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(files):05d}\.safetensors", f) for f in files), files
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    tensors = exported_tensors(exported)
    assert set(weight_map) == set(tensors) == {PREFIX + name for name in hf.hf_names(tiny.config)}
    assert set(weight_map.values()) == set(files)
    for file_name in files:
        in_file = load_numpy(exported / file_name)
        assert set(in_file) == {name for name, f in weight_map.items() if f == file_name}
        nbytes = sum(t.nbytes for t in in_file.values())
        assert nbytes <= 100_000 or len(in_file) == 1, (file_name, nbytes)  # only a lone tensor may exceed it
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    assert_round_trip(stored_tensors(tiny.checkpoint.directory), tensors, tiny.config)
    assert np.array_equal(hf_logits(transformers_model(exported), tiny.ids, tiny.mask), tiny.ref)


def test_export_copies_tokenizer_files_byte_identical(source, converted, tmp_path):
    exported = tmp_path / "exported"
    export(converted, exported, progress=False)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            assert (exported / name).read_bytes() == (source / name).read_bytes(), name


# -- bfloat16 -------------------------------------------------------------------------------------------------------
def test_bf16_conversion_stores_bf16(converted, converted_bf16):
    stored = ocp.StandardCheckpointer().restore(str(converted_bf16 / "params"))
    assert {leaf.dtype for leaf in jax.tree.leaves(stored)} == {jnp.dtype(jnp.bfloat16)}
    _, fp32 = from_pretrained(converted)
    # Each stored value is the float32 weight rounded to nearest bfloat16.
    assert params_equal(stored, jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16), fp32))


DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16]


@pytest.mark.parametrize("src", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("dst", DTYPES, ids=lambda d: np.dtype(d).name)
def test_transpose_casts_exactly_as_numpy(src, dst):
    """The XLA transpose used for linear weights rounds as numpy does: ties, overflow, denormals, NaN, -0."""
    rng = np.random.default_rng(0)
    values = rng.standard_normal((96, 160)).astype(np.float32) * np.exp2(rng.integers(-140, 120, (96, 160)))
    values.flat[:9] = [np.nan, np.inf, -np.inf, -0.0, 1e-40, -1e-45, 6e-8, 65520.0, 1 + 2**-8]
    with np.errstate(over="ignore"):
        matrix = values.astype(np.float32).astype(src)
        expected = np.ascontiguousarray(matrix.T).astype(dst)
    got = hf._transpose(matrix, np.dtype(dst))
    bits = np.uint32 if np.dtype(dst).itemsize == 4 else np.uint16
    assert got.dtype == np.dtype(dst) and got.flags.c_contiguous
    np.testing.assert_array_equal(got.view(bits), expected.view(bits))


def test_bf16_conversion_logits(tiny, converted_bf16, rounded_bf16):
    model, params = from_pretrained(converted_bf16)  # float32 compute, upcast on load
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    logits = jax_logits(model, params, tiny.ids, tiny.mask)
    assert relative_max_error(logits, tiny.ref, tiny.mask) <= BF16_RTOL
    assert_parity(logits, rounded_bf16[1], tiny.mask)  # exactly the rounded weights


def test_bf16_conversion_exports_float32_for_transformers(tiny, converted_bf16, rounded_bf16, tmp_path):
    exported = tmp_path / "exported"
    export(converted_bf16, exported, dtype="float32", progress=False)
    tensors = exported_tensors(exported)
    assert {t.dtype for t in tensors.values()} == {np.dtype(np.float32)}
    rounded_model, rounded_logits = rounded_bf16
    assert_round_trip({k: v for k, v in rounded_model.state_dict().items() if k.startswith(PREFIX)}, tensors,
                      tiny.config)
    model = transformers_model(exported)
    assert model.dtype == torch.float32
    assert np.array_equal(hf_logits(model, tiny.ids, tiny.mask), rounded_logits)


def test_export_config_declares_stored_dtype(converted_bf16, tmp_path):
    """A bf16 export (dtype kept) says bfloat16 in config.json, as transformers reads it (`dtype="auto"`)."""
    exported = tmp_path / "exported"
    export(converted_bf16, exported, progress=False)
    assert {t.dtype for t in exported_tensors(exported).values()} == {np.dtype(ml_dtypes.bfloat16)}
    assert transformers.AutoConfig.from_pretrained(exported).dtype == torch.bfloat16
    assert transformers.BloomForCausalLM.from_pretrained(exported, dtype="auto").dtype == torch.bfloat16


@pytest.mark.parametrize("storage", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_source_round_trips(tiny, tmp_path, storage):
    """A hub-style fp16/bf16 checkpoint converts to exact float32 and exports back to the same bits."""
    src, out, exported = tmp_path / "src", tmp_path / "out", tmp_path / "exported"
    src.mkdir()
    write_safetensors(copy.deepcopy(tiny.checkpoint.torch_model).to(storage), src)
    convert(src, out, progress=False)
    export(out, exported, dtype=str(storage).removeprefix("torch."), progress=False)
    assert_round_trip(stored_tensors(src), exported_tensors(exported), tiny.config)


# -- loading a conversion -------------------------------------------------------------------------------------------
def test_from_pretrained_casts_on_load(tiny, converted):
    model, params = from_pretrained(converted, dtype="bfloat16")
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    logits = jax_logits(model, params, tiny.ids, tiny.mask).astype(np.float32)
    assert relative_max_error(logits, tiny.ref, tiny.mask) <= BF16_RTOL


def test_from_pretrained_unrolled_layers(tiny, converted):
    model, params = from_pretrained(converted, scan_layers=False)
    assert {f"h_{i}" for i in range(tiny.config.n_layer)} <= set(params) and "h" not in params
    logits = jax_logits(model, params, tiny.ids, tiny.mask)
    assert_parity(logits, tiny.ref, tiny.mask)
    scanned_model, scanned = from_pretrained(converted)
    np.testing.assert_allclose(logits, jax_logits(scanned_model, scanned, tiny.ids, tiny.mask), rtol=0, atol=1e-5)


def test_from_pretrained_on_a_mesh(tiny, converted):
    mesh = jax.make_mesh((1,), ("data",))
    model, params = from_pretrained(converted, mesh=mesh)
    for leaf in jax.tree.leaves(params):
        assert isinstance(leaf.sharding, jax.sharding.NamedSharding) and leaf.sharding.mesh == mesh
    assert_parity(jax_logits(model, params, tiny.ids, tiny.mask), tiny.ref, tiny.mask)


# -- URL destinations -----------------------------------------------------------------------------------------------
def test_convert_to_file_url(tiny, source, converted, tmp_path):
    url = "file://" + str(tmp_path / "u")
    assert convert(source, url, progress=False) == tiny.config
    assert is_converted(url) and is_converted(tmp_path / "u")
    for name, data in TOKENIZER.items():
        assert (tmp_path / "u" / name).read_bytes() == data
    _, local = from_pretrained(converted)
    assert params_equal(ocp.StandardCheckpointer().restore(str(tmp_path / "u" / "params")), local)
    # A URL source exports too.
    export(url, tmp_path / "exported", progress=False)
    assert_round_trip(stored_tensors(source), exported_tensors(tmp_path / "exported"), tiny.config)


def test_from_pretrained_file_url(tiny, converted):
    model, params = from_pretrained("file://" + str(converted))
    assert_parity(jax_logits(model, params, tiny.ids, tiny.mask), tiny.ref, tiny.mask)


# -- bad inputs through the CLI -------------------------------------------------------------------------------------
def hf_source(write: Callable = write_safetensors, damage: Callable[[Path], None] = lambda d: None):
    """A case's source: a fresh checkpoint written by `write`, then damaged."""

    def make(tmp_path: Path, torch_model, converted: Path) -> str:
        src = tmp_path / "src"
        src.mkdir()
        write(torch_model, src)
        damage(src)
        return str(src)

    return make


def converted_source(tmp_path, torch_model, converted) -> str:
    return str(converted)


def missing_source(tmp_path, torch_model, converted) -> str:
    return str(tmp_path / "no_such_model")


# name: (command, source maker, extra arguments, regex the error line must match)
BAD_INPUTS: dict[str, tuple[str, Callable, list[str], str]] = {
    "nonexistent_src": ("convert", missing_source, [], r"no such directory"),
    "empty_src_dir": ("convert", hf_source(lambda torch_model, d: None), [], r"config\.json"),
    "no_checkpoint": ("convert", hf_source(save_config), [], r"no checkpoint"),
    "truncated_safetensors": ("convert", hf_source(damage=truncate("model.safetensors")), [], r"model\.safetensors"),
    "missing_shard": ("convert", hf_source(write_safetensors_sharded, delete_second_shard), [],
                      r"model-00002-of-\d{5}\.safetensors"),
    "missing_tensor": ("convert", hf_source(damage=without_tensor("h.1.mlp.dense_4h_to_h.bias")), [],
                       r"missing.*h\.1\.mlp\.dense_4h_to_h\.bias"),
    "config_hidden_size": ("convert", hf_source(damage=config_says(hidden_size=32)), [], r"shape"),
    "config_more_layers": ("convert", hf_source(damage=config_says(n_layer=3)), [], r"missing.*h\.2\."),
    "config_fewer_layers": ("convert", hf_source(damage=config_says(n_layer=1)), [], r"unexpected.*h\.1\."),
    "unsupported_dtype": ("convert", hf_source(), ["--dtype", "int8"], r"unsupported dtype.*int8"),
    "export_unsupported_dtype": ("export", converted_source, ["--dtype", "int8"], r"unsupported dtype.*int8"),
    "export_not_converted": ("export", hf_source(), [], r"no converted checkpoint"),
    "export_nonexistent_src": ("export", missing_source, [], r"no converted checkpoint"),
    "max_shard_size_unit": ("export", converted_source, ["--max-shard-size", "5XB"], r"not a size.*5XB"),
    "max_shard_size_zero": ("export", converted_source, ["--max-shard-size", "0"], r"not a size"),
    "max_shard_size_negative": ("export", converted_source, ["--max-shard-size=-1MB"], r"not a size"),
}


def assert_one_line_error(rc: int, capsys, pattern: str) -> None:
    out, err = capsys.readouterr()
    assert rc == 2, (rc, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("bloom-jax: error: ") and re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in err and out == ""


@pytest.mark.parametrize("existing_dst", [False, True], ids=["no_dst", "existing_dst_overwrite"])
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_leaves_nothing(tiny, converted, tmp_path, capsys, case, existing_dst):
    command, make_source, extra, pattern = BAD_INPUTS[case]
    src = make_source(tmp_path, tiny.checkpoint.torch_model, converted)
    dst = tmp_path / "dst"
    before = populate(dst) if existing_dst else None
    entries = set(tmp_path.iterdir())
    capsys.readouterr()  # whatever writing the source printed
    rc = main([command, src, str(dst), *extra, *(["--overwrite"] if existing_dst else [])])
    assert_one_line_error(rc, capsys, pattern)
    assert not is_converted(dst)
    if existing_dst:
        assert snapshot(dst) == before  # a failed --overwrite keeps what was there
    else:
        assert not dst.exists()
    assert set(tmp_path.iterdir()) == entries  # in particular, no staging directory


@pytest.mark.parametrize("command,url", [("convert", False), ("convert", True), ("export", False)],
                         ids=["convert", "convert_file_url", "export"])
def test_non_empty_dst_needs_overwrite(tiny, source, converted, tmp_path, capsys, command, url):
    src = source if command == "convert" else converted
    directory = tmp_path / "dst"
    dst = "file://" + str(directory) if url else str(directory)
    before = populate(directory)
    assert_one_line_error(main([command, str(src), dst]), capsys, r"not empty.*--overwrite")
    assert snapshot(directory) == before
    assert not list(tmp_path.glob(STAGING))

    assert main([command, str(src), dst, "--overwrite"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["to"] == dst
    assert not (directory / "notes.txt").exists() and not (directory / "sub").exists()
    assert not list(tmp_path.glob(STAGING))
    if command == "convert":
        model, params = from_pretrained(dst)
        assert_parity(jax_logits(model, params, tiny.ids, tiny.mask), tiny.ref, tiny.mask)
    else:
        assert report["files"] == ["model.safetensors"]
        assert_round_trip(stored_tensors(source), exported_tensors(directory), tiny.config)


# -- interrupted conversions ----------------------------------------------------------------------------------------
def fail_on_read(monkeypatch, tmp_path: Path, error: type[BaseException], call: int = 5) -> dict:
    """Makes the `call`-th `WeightFiles.read` raise `error`; records the calls and the staging directories then."""
    seen = {"calls": 0, "staging": []}
    original = hf_files.WeightFiles.read

    def read(self, name):
        seen["calls"] += 1
        if seen["calls"] == call:
            seen["staging"] = list(tmp_path.glob(STAGING))
            raise error("interrupted by the test")
        return original(self, name)

    monkeypatch.setattr(hf_files.WeightFiles, "read", read)
    return seen


@pytest.mark.parametrize("existing_dst", [False, True], ids=["no_dst", "existing_dst_overwrite"])
@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError, BloomJaxError])
def test_interrupted_conversion_leaves_nothing(source, tmp_path, monkeypatch, error, existing_dst):
    dst = tmp_path / "out"
    before = populate(dst) if existing_dst else None
    seen = fail_on_read(monkeypatch, tmp_path, error)
    with pytest.raises(error):
        convert(source, dst, overwrite=existing_dst, progress=False)
    assert seen["calls"] == 5 and len(seen["staging"]) == 1  # it stopped midway, with a staging directory
    assert not is_converted(dst)
    if existing_dst:
        assert snapshot(dst) == before
    else:
        assert not dst.exists()
    assert not list(tmp_path.glob(STAGING))


def test_interrupted_cli_conversion(source, tmp_path, monkeypatch, capsys):
    dst = tmp_path / "out"
    fail_on_read(monkeypatch, tmp_path, KeyboardInterrupt)
    assert main(["convert", str(source), str(dst)]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "bloom-jax: interrupted"
    assert not dst.exists() and not list(tmp_path.glob(STAGING))


def test_interrupted_url_conversion_is_not_loadable(source, tmp_path, monkeypatch):
    url = "file://" + str(tmp_path / "u")
    fail_on_read(monkeypatch, tmp_path, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        convert(source, url, progress=False)
    assert not is_converted(url)
    with pytest.raises(BloomJaxError):
        from_pretrained(url)


@pytest.mark.parametrize("url", [False, True], ids=["local", "file_url"])
def test_interrupted_while_copying_tokenizer_is_not_loadable(source, tmp_path, monkeypatch, url):
    """Stopped after the parameters are written, while the tokenizer files are copied: the destination must not
    look converted (`is_converted` is what from_pretrained and export trust), also for a URL written in place."""
    dst = "file://" + str(tmp_path / "out") if url else tmp_path / "out"
    read_bytes = Path.read_bytes

    def interrupted_on_tokenizer(self):
        if self == source / "tokenizer.json":
            raise KeyboardInterrupt
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", interrupted_on_tokenizer)
    with pytest.raises(KeyboardInterrupt):
        convert(source, dst, progress=False)
    assert not is_converted(dst)
    assert not list(tmp_path.glob(STAGING))


def test_failed_conversion_leaves_no_write_in_flight(tiny, tmp_path, monkeypatch):
    """A read fails while the previous (large) tensor is still being written: `convert` must wait for (or
    cancel) that write before it returns, or the write lands after the staging directory was removed and
    recreates it, leaving a `.out.partial-*` directory (and the tensor's bytes) behind."""
    src = tmp_path / "src"
    shutil.copytree(tiny.checkpoint.directory, src)
    vocab = 2**18  # a 64 MiB embedding
    rewrite_safetensors(lambda tensors: tensors.update({PREFIX + "word_embeddings.weight": torch.ones(vocab, 64)}))(src)
    config_says(vocab_size=vocab)(src)
    futures, previous = [], []
    write, read = OrbaxParamsWriter.write, hf_files.WeightFiles.read

    def recording_write(self, *args, **kwargs):
        result = write(self, *args, **kwargs)
        futures.extend(result or [])
        return result

    def read_fails_after_embedding(self, name):
        if previous and previous[-1].endswith("word_embeddings.weight"):
            raise OSError("interrupted by the test")
        previous.append(name)
        return read(self, name)

    monkeypatch.setattr(OrbaxParamsWriter, "write", recording_write)
    monkeypatch.setattr(hf_files.WeightFiles, "read", read_fails_after_embedding)
    for attempt in range(3):  # the race shows on most attempts; once is a failure
        futures.clear(), previous.clear()
        out = tmp_path / f"out{attempt}"
        with pytest.raises(OSError):
            convert(src, out, progress=False)
        assert previous[-1].endswith("word_embeddings.weight")
        assert all(future.done() for future in futures), "convert returned with writes still running"
        time.sleep(0.3)
        assert not out.exists() and not list(tmp_path.glob(STAGING))


# -- untrusted pickles ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("legacy", [False, True], ids=["zip_format", "legacy_format"])
def test_convert_refuses_malicious_pickle(tiny, tmp_path, legacy):
    src, out, marker = tmp_path / "model", tmp_path / "out", tmp_path / "MARKER"
    src.mkdir()
    write_malicious_bin(tiny.checkpoint.torch_model, src, marker, legacy)
    with pytest.raises(BloomJaxError, match=r"pytorch_model\.bin"):
        convert(src, out, progress=False)
    assert not marker.exists()
    assert not out.exists() and not list(tmp_path.glob(STAGING))


# -- progress -------------------------------------------------------------------------------------------------------
def test_progress_bar_on_stderr(tiny, source, tmp_path, capsys):
    n = len(hf.hf_names(tiny.config))
    convert(source, tmp_path / "quiet", progress=False)
    assert capsys.readouterr().err == ""
    convert(source, tmp_path / "out", progress=True)
    out, err = capsys.readouterr()
    assert out == "" and re.search(rf"\b{n}/{n} tensors", err), err
