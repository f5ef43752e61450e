"""`Generator` (bucketed, streaming text generation), the decode weight formats, the `generate` command and the
compilation cache.

Compiles are what cost time here (about 4 s per prefill/decode pair): the tests share two module-scoped
generators over one model, and keep to batch bucket 4 (three prompts), prompt bucket 16 and token bucket 16
wherever they can, so that most calls reuse a compiled program.
"""

from __future__ import annotations

import json
import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from commands import run_cli
from reference import (config_says, hf_generate, hf_model, left_padded, relative_max_error, save_hf,
                       tiny_config)

from bloom_jax.checkpoints import convert
from bloom_jax.config import load_config
from bloom_jax.errors import BloomJaxError
from bloom_jax.generate import GenerationDefaults, Generator, Sampling, TextPiece, bucket, decode, prefill
from bloom_jax.model import abstract_params, make_model, unstack_layers
from bloom_jax.tokenizer import Tokenizer
from bloom_jax.weights import to_decode_weights

NEW_TOKENS = 16
EOS, PAD = 2, 3
# Three prompts (batch bucket 4), each well under 16 tokens (prompt bucket 16).
PROMPTS = ["The cat sat on the mat.", "Paris est la capitale", "¿Qué tal? 🌍"]
TRAINING_TEXTS = [
    "The cat sat on the mat. The dog sat on the log. A bird sang in the tree.",
    "Paris est la capitale de la France. Le modèle a été entraîné près de Paris.",
    "¿Qué tal? El modelo habla español, français, English y más… 🌍🚀 大型语言模型。",
]


def train_tokenizer(directory, vocab_size: int = 400) -> None:
    """A small byte-level BPE with BLOOM's pre-tokeniser and special tokens, trained offline (as
    test_tokenizer.py does), saved as `directory/tokenizer.json`."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HfTokenizer

    tok = HfTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(" ?[^(\\s|[.,!?…。，、।۔،])]+"), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAINING_TEXTS * 3, trainer)
    tok.save(str(directory / "tokenizer.json"))


def until_eos(row, eos: int) -> list[int]:
    """A row of new tokens up to and including its first EOS (what `Completion.completion_ids` holds)."""
    row = [int(t) for t in row]
    return row[: row.index(eos) + 1] if eos in row else row


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A model whose greedy continuations vary (linear gain 3) saved by transformers (no tokenizer), the same
    directory with a tokenizer.json, its conversion, a left-padded batch of token prompts and transformers'
    greedy continuations of it."""
    config = tiny_config()
    torch_model = hf_model(config, linear_gain=3.0)
    hf_dir = save_hf(torch_model, tmp_path_factory.mktemp("hf"))
    with_tokenizer = tmp_path_factory.mktemp("hf_tokenizer") / "model"
    shutil.copytree(hf_dir, with_tokenizer)
    train_tokenizer(with_tokenizer)
    converted = tmp_path_factory.mktemp("converted") / "model"
    convert(with_tokenizer, converted, progress=False)
    ids, mask = left_padded(config, [7, 4, 1])
    prompts = [row[m == 1].tolist() for row, m in zip(ids, mask)]
    expected = hf_generate(torch_model, ids, mask, NEW_TOKENS)
    assert all(len(set(row)) >= 4 for row in expected.tolist())  # continuations vary: the tests can fail
    return dict(config=config, torch_model=torch_model, hf_dir=hf_dir, converted=converted, ids=ids, mask=mask,
                prompts=prompts, expected=expected)


@pytest.fixture(scope="module")
def plain(setup) -> Generator:
    """The transformers directory as is: float weights, no tokenizer."""
    return Generator.from_pretrained(setup["hf_dir"])


@pytest.fixture(scope="module")
def gen(setup) -> Generator:
    """The converted checkpoint with float32 out-major decode weights (the CLI's default) and its tokenizer."""
    return Generator.from_pretrained(setup["converted"], decode_weights="float32")


# -- greedy equals transformers, through the buckets ---------------------------------------------------------------
@pytest.mark.parametrize("which", ["plain", "gen"])
def test_greedy_equals_transformers_through_the_buckets(setup, plain, gen, which):
    generator = plain if which == "plain" else gen
    # Batch 3 -> 4, prompt 7 -> 16, 16 new tokens: the bucket padding must not change a token.
    assert (bucket(3, 1), bucket(7), bucket(NEW_TOKENS)) == (4, 16, 16)
    completions = generator.generate(setup["prompts"], max_new_tokens=NEW_TOKENS)
    assert [c.prompt_ids for c in completions] == setup["prompts"]
    assert [c.completion_ids for c in completions] == [until_eos(row, EOS) for row in setup["expected"]]
    if which == "plain":
        assert generator.tokenizer is None and all(c.prompt is None and c.completion is None for c in completions)
        assert generator.model.decode_weights is None
    else:
        assert generator.model.decode_weights == "float32" and generator.tokenizer is not None
    assert not generator.model.scan_layers  # on CPU the unrolled layout, whatever was stored


@pytest.mark.slow
@pytest.mark.parametrize("decode_weights", [None, "int8"])
def test_the_accelerators_layout_and_kernels_generate_the_same(setup, decode_weights):
    # What a TPU or GPU gets: scanned layers, the reference kernels, blockwise attention for the prompt.
    accelerator = Generator.from_pretrained(setup["converted"], decode_weights=decode_weights, scan_layers=True,
                                            kernels="reference", attention="blockwise")
    cpu = Generator.from_pretrained(setup["converted"], decode_weights=decode_weights)
    assert accelerator.model.scan_layers and accelerator.model.kernels.attention == "blockwise"
    assert not cpu.model.scan_layers and cpu.model.kernels.decode_matmul == "xla_cpu"
    ours = accelerator.generate(setup["prompts"], max_new_tokens=NEW_TOKENS)
    expected = cpu.generate(setup["prompts"], max_new_tokens=NEW_TOKENS)
    assert [c.completion_ids for c in ours] == [c.completion_ids for c in expected]
    if decode_weights is None:
        assert [c.completion_ids for c in ours] == [until_eos(row, EOS) for row in setup["expected"]]


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["data=2,tensor=4", "fsdp=4,tensor=2"])
def test_sharded_generation_equals_transformers(setup, spec):
    from bloom_jax.sharding import make_mesh

    mesh = make_mesh(spec)
    generator = Generator.from_pretrained(setup["converted"], decode_weights="float32", mesh=mesh)
    completions = generator.generate(setup["prompts"], max_new_tokens=NEW_TOKENS)
    assert [c.completion_ids for c in completions] == [until_eos(row, EOS) for row in setup["expected"]]
    # One prompt: a batch of 1 cannot be split over the data axes; the rules then split the cache by heads alone.
    (alone,) = generator.generate(setup["prompts"][:1], max_new_tokens=NEW_TOKENS)
    assert alone.completion_ids == completions[0].completion_ids

    # The KV cache is split over all 8 devices along its batch x heads axis: 4 rows (the bucket of 3 prompts)
    # x 8 heads, over the batch's mesh axis (data or fsdp), then tensor (heads).
    ids = np.ones((4, 8), np.int32)
    with generator.sharding.for_batch(4).context():
        state = prefill(generator.model, generator.params, ids, np.ones_like(ids), np.ones(4, bool),
                        jax.random.key(0), np.array([EOS], np.int32), 3, Sampling(), NEW_TOKENS)
    keys_zth = state["cache"].keys[0]
    assert keys_zth.shape[0] == 4 * setup["config"].n_head
    assert keys_zth.sharding.shard_shape(keys_zth.shape) == (keys_zth.shape[0] // 8, *keys_zth.shape[1:])


def test_eos_stops_a_sequence_like_transformers(setup, plain):
    expected = setup["expected"]
    row0 = expected[0].tolist()
    # A token row 0 first produces midway, after at least two other tokens: treat it as EOS.
    eos = next(t for i, t in enumerate(row0) if i >= 2 and row0.index(t) == i)
    first = row0.index(eos)
    config = plain.model.config
    generator = Generator(plain.model.clone(config=config.replace(eos_token_id=eos)), plain.params)
    assert generator.eos_token_id == eos
    completions = generator.generate(setup["prompts"], max_new_tokens=NEW_TOKENS)
    reference = hf_generate(setup["torch_model"], setup["ids"], setup["mask"], NEW_TOKENS, eos_token_id=eos)
    assert [c.completion_ids for c in completions] == [until_eos(row, eos) for row in reference]
    assert completions[0].completion_ids == row0[: first + 1]  # stops at EOS, EOS included, nothing after
    assert eos not in row0[:first] and len(completions[0].completion_ids) < NEW_TOKENS
    # Streaming stops each sequence at its EOS too (and reuses the programs compiled above).
    pieces = list(generator.stream(setup["prompts"], max_new_tokens=NEW_TOKENS))
    assert by_prompt(pieces, 3)[1] == [c.completion_ids for c in completions]


def test_generator_honours_the_config_special_tokens_and_length():
    config = tiny_config(eos_token_id=7, pad_token_id=5, seq_length=16)
    model = make_model(config, scan_layers=False)
    generator = Generator(model, {})  # only the config is read
    assert (generator.eos_token_id, generator.pad_token_id, generator.max_length) == (7, 5, 16)


# -- buckets: no recompilation within one --------------------------------------------------------------------------
def test_a_new_length_in_the_same_bucket_does_not_recompile(setup, gen):
    rng = np.random.default_rng(3)

    def prompts(longest):  # three prompts: batch bucket 4
        return [rng.integers(4, setup["config"].vocab_size, n).tolist() for n in (longest, 3, 1)]

    assert bucket(5) == bucket(9) == 16 and bucket(20) == 32 and bucket(10) == bucket(16) == 16
    assert [bucket(n, 1) for n in (1, 2, 3, 4, 5)] == [1, 2, 4, 4, 8]
    first = gen.generate(prompts(5), max_new_tokens=10)  # may compile (if no other test did)
    sizes = prefill._cache_size(), decode._cache_size()
    second = gen.generate(prompts(9), max_new_tokens=16)
    list(gen.stream(prompts(7), max_new_tokens=12))  # streaming runs the same programs, step after step
    assert (prefill._cache_size(), decode._cache_size()) == sizes
    assert len(first[0].prompt_ids) == 5 and len(second[0].prompt_ids) == 9
    assert all(len(c.completion_ids) <= 10 for c in first) and all(len(c.completion_ids) <= 16 for c in second)
    assert len(first[0].completion_ids) == 10 or first[0].completion_ids[-1] == gen.eos_token_id
    gen.generate(prompts(20), max_new_tokens=16)  # prompt bucket 32: new programs
    assert prefill._cache_size() == sizes[0] + 1 and decode._cache_size() == sizes[1] + 1


# -- text and streaming ---------------------------------------------------------------------------------------------
SAMPLED = dict(temperature=0.8, top_p=0.9)


def by_prompt(pieces: list[TextPiece], n: int) -> tuple[list[str], list[list[int]]]:
    """Concatenated text and token ids of the pieces of each of n prompts."""
    texts, ids = [""] * n, [[] for _ in range(n)]
    for piece in pieces:
        texts[piece.index] += piece.text
        if piece.token_id is not None:
            ids[piece.index].append(piece.token_id)
    return texts, ids


@pytest.mark.parametrize("sampling", [{}, SAMPLED], ids=["greedy", "sampled"])
def test_streamed_pieces_add_up_to_the_completions(gen, sampling):
    assert gen.tokenizer.vocab_size <= gen.model.config.vocab_size
    assert all(len(gen.tokenizer.encode(p)) <= 16 for p in PROMPTS)
    completions = gen.generate(PROMPTS, max_new_tokens=NEW_TOKENS, seed=1, **sampling)
    pieces = list(gen.stream(PROMPTS, max_new_tokens=NEW_TOKENS, seed=1, **sampling))
    texts, ids = by_prompt(pieces, len(PROMPTS))
    assert ids == [c.completion_ids for c in completions]
    assert texts == [c.completion for c in completions]
    assert all(c.completion == gen.tokenizer.decode(c.completion_ids) for c in completions)
    assert [c.prompt for c in completions] == PROMPTS
    assert [c.prompt_ids for c in completions] == [gen.tokenizer.encode(p) for p in PROMPTS]
    assert len({t for c in completions for t in c.completion_ids}) >= 8  # varied continuations
    assert sum(len(c.completion) for c in completions) > 0

    received: list[TextPiece] = []
    with_callback = gen.generate(PROMPTS, max_new_tokens=NEW_TOKENS, seed=1, on_text=received.append, **sampling)
    assert received == pieces
    assert with_callback == completions


def test_sampling_is_reproducible_from_the_seed(gen):
    def sample(seed):
        return [c.completion_ids for c in gen.generate(PROMPTS, max_new_tokens=NEW_TOKENS, seed=seed, **SAMPLED)]

    first = sample(1)
    assert sample(1) == first
    assert sample(2) != first
    greedy = [c.completion_ids for c in gen.generate(PROMPTS, max_new_tokens=NEW_TOKENS)]
    assert first != greedy  # it really samples
    assert all(len(ids) == NEW_TOKENS or ids[-1] == gen.eos_token_id for ids in first)


def test_generator_mistakes_are_clear_errors(plain, gen):
    with pytest.raises(BloomJaxError, match="text prompts need a tokenizer"):
        plain.generate(["hello"])
    with pytest.raises(BloomJaxError, match="max new tokens must be at least 1"):
        gen.generate(PROMPTS, max_new_tokens=0)
    with pytest.raises(BloomJaxError, match="no prompts"):
        gen.generate([])
    with pytest.raises(BloomJaxError, match="token ids must be in"):
        plain.generate([[1, 2, 512]])
    with pytest.raises(BloomJaxError, match="top-p must be in"):
        gen.generate(PROMPTS, top_p=0.0)


# -- decode weight formats -------------------------------------------------------------------------------------------
WEIGHTS = ("float32", "bfloat16", "int8")


def random_init(model, seed: int = 0) -> dict:
    """Parameters distributed as `init_params` makes them (normal(initializer_range) kernels and embedding, zero
    biases, unit LayerNorm scales), drawn with numpy: jitting `model.init` takes longer than the whole test."""
    from flax.traverse_util import flatten_dict, unflatten_dict

    rng = np.random.default_rng(seed)

    def value(path, shape):
        if path[-1] in ("scale", "bias"):
            return np.full(shape.shape, 1.0 if path[-1] == "scale" else 0.0, np.float32)
        return rng.normal(0.0, model.config.initializer_range, shape.shape).astype(np.float32)

    return unflatten_dict({path: value(path, shape)
                           for path, shape in flatten_dict(nn.unbox(abstract_params(model))).items()})


@pytest.fixture(scope="module")
def random_tiny():
    """bloom-tiny with random init weights, a left-padded batch (80 real tokens) and its logits with float
    weights ("float") and with each decode weight format, all computed in one compiled program."""
    model = make_model(load_config("bloom-tiny"))
    params = random_init(model)
    ids, mask = left_padded(model.config, [32, 24, 16, 8])

    @jax.jit
    def logits(params):
        out = {"float": model.apply({"params": params}, ids, mask)}
        for weights in WEIGHTS:
            decode_params = to_decode_weights(params, weights)
            out[weights] = model.clone(decode_weights=weights).apply({"params": decode_params}, ids, mask)
        return out

    return model, params, mask, jax.tree.map(np.asarray, logits(params))


# Measured on this model and batch: max |error| / max |logit| 1.5e-3 (bfloat16) and 5.6e-3 (int8), top-1
# agreement 80/80 for both (5.2e-3 and 4.7e-3 for int8 on two other batches, still 80/80); float32 decode weights
# give the float logits exactly (0.0), the bar for them is the package's float32 parity bar.
@pytest.mark.parametrize("weights, rtol, min_top1", [("float32", 2e-5, 1.0), ("bfloat16", 1e-2, 0.95),
                                                     ("int8", 2e-2, 0.95)])
def test_decode_weights_logits_are_close_to_float(random_tiny, weights, rtol, min_top1):
    _, _, mask, logits = random_tiny
    ours, ref, keep = logits[weights], logits["float"], mask.astype(bool)
    assert np.abs(ref[keep]).max() > 1.0  # logits large enough for a relative bound to mean something
    error = relative_max_error(ours, ref, keep)
    top1 = float((ours.argmax(-1) == ref.argmax(-1))[keep].mean())
    assert error <= rtol, f"{weights}: relative max error {error:.3g} exceeds {rtol:.3g}"
    assert top1 >= min_top1, f"{weights}: top-1 agreement {top1:.3f} below {min_top1}"
    if weights != "float32":
        assert error > 1e-5  # the lower precision really is in use


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("weights", WEIGHTS)
def test_decode_weights_have_the_model_shapes(random_tiny, weights, scan_layers):
    model, params, *_ = random_tiny
    model = model.clone(scan_layers=scan_layers)
    if not scan_layers:
        params = unstack_layers(params)
    expected = nn.unbox(abstract_params(model.clone(decode_weights=weights)))
    converted = jax.eval_shape(lambda p: to_decode_weights(p, weights), params)  # shapes only: nothing compiled
    assert jax.tree.map(lambda a: (a.shape, a.dtype), converted) == \
        jax.tree.map(lambda a: (a.shape, a.dtype), expected)
    layer = converted["h"] if scan_layers else converted["h_0"]
    kernel = layer["self_attention"]["query_key_value"]["kernel"]
    cfg = model.config
    assert kernel.shape == ((cfg.n_layer,) if scan_layers else ()) + (cfg.n_head, 3, cfg.head_dim, cfg.hidden_size)
    assert kernel.dtype == jnp.dtype(weights)  # out-major, in the format's dtype
    assert ("scale" in layer["mlp"]["dense_h_to_4h"]) == (weights == "int8")
    assert ("scale" in converted["word_embeddings"]) == (weights == "int8")


def test_the_decode_loop_converts_only_the_embedding_rows_it_reads(random_tiny):
    """XLA:CPU once turned the gather from a bf16 table into a float32 copy of the whole table, made before the
    loop on every call (1 GB and 0.3 s for bloom-560m); now only the gathered rows are converted."""
    model, params, *_ = random_tiny
    gen = Generator(model, params, decode_weights="bfloat16")
    ids = np.ones((1, 4), np.int32)
    sampling = Sampling()
    state = prefill(gen.model, gen.params, ids, np.ones_like(ids), np.ones(1, bool), jax.random.key(0),
                    np.array([2], np.int32), 3, sampling, 4)
    hlo = decode.lower(gen.model, gen.params, state, 4, sampling).compile().as_text()
    cfg = model.config
    table = f"[{cfg.vocab_size},{cfg.hidden_size}]"
    assert f"= bf16{table}" in hlo  # the table itself
    # No buffer holds a float32 table: only instructions outside fusion bodies get buffers (inside one, the
    # convert of the table computes just the elements the fused gather reads).
    computations = re.split(r"\n(?=\S)", hlo)
    with_buffers = [c for c in computations if not c.startswith(("%fused_computation", "%wrapped_"))]
    assert not [c for c in with_buffers if f"= f32{table}" in c]
    assert any(f"= f32{table}" in c for c in computations)  # XLA:CPU still gathers bf16 through float32


# -- the generate command -----------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _no_cache_from_the_environment(monkeypatch):
    monkeypatch.delenv("BLOOM_JAX_COMPILATION_CACHE", raising=False)


def prompt_flags(prompts):
    return [flag for p in prompts for flag in ("--prompt", p)]


def test_cli_json_lines(setup, gen):
    code, out, _ = run_cli("generate", setup["converted"], *prompt_flags(PROMPTS), "--max-new-tokens", 12, "--json")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == len(PROMPTS)
    results = [json.loads(line) for line in lines]
    assert all(set(r) == {"prompt", "prompt_ids", "completion", "completion_ids"} for r in results)
    assert [r["prompt"] for r in results] == PROMPTS
    assert [r["prompt_ids"] for r in results] == [gen.tokenizer.encode(p) for p in PROMPTS]
    assert all(1 <= len(r["completion_ids"]) <= 12 for r in results)
    # Greedy float32 decode weights: what the Generator gives for the same prompts.
    expected = gen.generate(PROMPTS, max_new_tokens=12)
    assert [r["completion_ids"] for r in results] == [c.completion_ids for c in expected]
    assert [r["completion"] for r in results] == [c.completion for c in expected]


@pytest.mark.parametrize("flags", [["--draft", "{converted}", "--draft-tokens", "3"], ["--prompt-lookup", "2"]])
def test_cli_speculative_decoding_prints_the_same_tokens_and_its_acceptance(setup, gen, flags):
    """The checkpoint drafting for itself (every proposal accepted) or prompt lookup: the tokens plain greedy
    decoding gives, each JSON line with the batch's rounds and acceptance; text mode prints the same text."""
    flags = [f.replace("{converted}", str(setup["converted"])) for f in flags]
    code, out, _ = run_cli("generate", setup["converted"], *prompt_flags(PROMPTS), "--max-new-tokens", 12, "--json",
                           *flags)
    assert code == 0
    results = [json.loads(line) for line in out.splitlines()]
    expected = gen.generate(PROMPTS, max_new_tokens=12)
    assert [r["completion_ids"] for r in results] == [c.completion_ids for c in expected]
    speculative = results[0]["speculative"]
    assert set(speculative) == {"rounds", "drafted_tokens", "accepted_tokens", "acceptance_rate", "tokens_per_round"}
    if flags[0] == "--draft":
        assert speculative["acceptance_rate"] == 1.0 and speculative["tokens_per_round"] == 4.0
    code, out, err = run_cli("generate", setup["converted"], *prompt_flags(PROMPTS), "--max-new-tokens", 12, *flags)
    assert code == 0 and out == "".join(f"{p}{c.completion}\n" for p, c in zip(PROMPTS, expected))
    assert "speculative decoding: " in err and "tokens per pass" in err


def test_cli_text_prints_each_prompt_and_its_completion(setup, gen):
    code, out, _ = run_cli("generate", setup["converted"], *prompt_flags(PROMPTS), "--max-new-tokens", 12)
    assert code == 0
    completions = [c.completion for c in gen.generate(PROMPTS, max_new_tokens=12)]
    assert out == "".join(f"{p}{c}\n" for p, c in zip(PROMPTS, completions))


def test_cli_prompts_file(setup, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(f"{PROMPTS[1]}\n\n{PROMPTS[2]}\n")  # blank lines are skipped
    code, out, _ = run_cli("generate", setup["converted"], "--prompt", PROMPTS[0], "--prompts-file", path,
                           "--max-new-tokens", 4, "--json")
    assert code == 0
    results = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in results] == PROMPTS  # --prompt first, then the file's lines in order
    assert all(1 <= len(r["completion_ids"]) <= 4 for r in results)


@pytest.mark.parametrize("flags, message", [
    (["--prompt", "hi", "--top-p", "0"], "top-p must be in (0, 1], got 0.0"),
    (["--prompt", "hi", "--top-p", "1.5"], "top-p must be in (0, 1], got 1.5"),
    (["--prompt", "hi", "--temperature", "-1"], "temperature must be >= 0"),
    (["--prompt", "hi", "--greedy", "--top-k", "5"], "--greedy cannot be combined"),
    (["--prompt", "hi", "--top-k", "-1"], "top-k must be >= 0"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens: must be at least 1, got 0"),
    (["--prompt", "hi", "--decode-weights", "int4"], "invalid choice: 'int4'"),
    ([], "no prompt: give --prompt TEXT or --prompts-file FILE"),
    (["--prompts-file", "{tmp}/missing.txt"], "cannot read"),
    (["--prompt", "hi", "--draft-tokens", "0"], "--draft-tokens: must be at least 1, got 0"),
    (["--prompt", "hi", "--draft", "{tmp}", "--prompt-lookup", "3"], "--draft and --prompt-lookup are two ways"),
])
def test_cli_bad_flags_are_one_line_and_exit_2(setup, tmp_path, flags, message):
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    code, out, err = run_cli("generate", setup["converted"], *flags)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bloom-jax: error:") and message in lines[0], err
    assert "Traceback" not in err


def error_line(err: str) -> str:
    """The one error line; any other stderr line is the 'loading ...' log."""
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("bloom-jax: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert all(line.startswith("loading ") for line in lines[:-1]), err
    assert "Traceback" not in err
    return errors[0]


def test_cli_checkpoint_mistakes(setup, tmp_path):
    code, out, err = run_cli("generate", setup["hf_dir"], "--prompt", "hi")
    assert code == 2 and out == "" and "has no tokenizer.json" in error_line(err)
    code, out, err = run_cli("generate", tmp_path / "missing", "--prompt", "hi")
    assert code == 2 and out == "" and "no such directory" in error_line(err)


@pytest.mark.parametrize("key", [
    "n_positions",
    "seq_length",
])
def test_cli_prompt_beyond_the_length_limit(setup, gen, tmp_path, key):
    limited = tmp_path / "limited"
    shutil.copytree(setup["converted"], limited)
    config_says(**{key: 16})(limited)
    n = max(len(gen.tokenizer.encode(p)) for p in PROMPTS)  # the longest prompt decides
    assert 1 < n < 16
    code, out, err = run_cli("generate", limited, *prompt_flags(PROMPTS), "--max-new-tokens", 17 - n, "--json")
    message = error_line(err)
    assert code == 2 and out == ""
    assert f"a prompt of {n} tokens plus {17 - n} new ones exceeds the model's length limit of 16" in message
    # Just within the limit: runs (batch, prompt and token buckets as elsewhere: nothing new to compile).
    code, out, _ = run_cli("generate", limited, *prompt_flags(PROMPTS), "--max-new-tokens", 16 - n, "--json")
    assert code == 0 and all(len(json.loads(line)["completion_ids"]) <= 16 - n for line in out.splitlines())


def test_tokenizer_of_the_converted_checkpoint_is_the_trained_one(setup):
    ours = Tokenizer.from_dir(setup["converted"])
    assert ours.vocab_size <= setup["config"].vocab_size
    assert ours.decode(ours.encode(PROMPTS[2])) == PROMPTS[2]


# -- generation_config.json ----------------------------------------------------------------------------------------
def test_generation_config_sets_eos_pad_and_budget_as_transformers_reads_them(setup, tmp_path):
    import torch

    row0 = setup["expected"][0].tolist()
    stop = next(t for i, t in enumerate(row0) if i >= 2 and row0.index(t) == i and t != EOS)  # a mid-row token
    directory = tmp_path / "model"
    shutil.copytree(setup["converted"], directory)
    generation = {"eos_token_id": [stop, EOS], "pad_token_id": PAD, "max_new_tokens": 6}
    (directory / "generation_config.json").write_text(json.dumps(generation))
    generator = Generator.from_pretrained(directory)
    assert generator.eos_token_ids == (stop, EOS) and generator.defaults.max_new_tokens == 6
    completions = generator.generate(setup["prompts"])  # budget and stop ids from the file
    with torch.no_grad():
        reference = setup["torch_model"].generate(
            input_ids=torch.as_tensor(setup["ids"], dtype=torch.long),
            attention_mask=torch.as_tensor(setup["mask"], dtype=torch.long), do_sample=False, **generation)
    reference = reference.numpy()[:, setup["ids"].shape[1]:]
    expected = [[int(t) for t in row][: next((i + 1 for i, t in enumerate(row) if t in (stop, EOS)), len(row))]
                for row in reference]
    assert [c.completion_ids for c in completions] == expected
    assert completions[0].completion_ids[-1] == stop and len(completions[0].completion_ids) <= 6


def test_generation_config_sampling_defaults(setup, tmp_path):
    directory = tmp_path / "model"
    shutil.copytree(setup["converted"], directory)
    (directory / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.7,
                                                                  "top_p": 0.9}))
    generator = Generator.from_pretrained(directory)
    assert generator.defaults.sampling == Sampling(0.7, 50, 0.9, 1.0)  # transformers' top-k default: 50
    by_default = generator.generate(setup["prompts"], max_new_tokens=8, seed=3)
    explicit = generator.generate(setup["prompts"], max_new_tokens=8, temperature=0.7, top_k=50, top_p=0.9, seed=3)
    assert [c.completion_ids for c in by_default] == [c.completion_ids for c in explicit]
    greedy = generator.generate(setup["prompts"], max_new_tokens=8, temperature=0.0)
    assert [c.completion_ids for c in greedy] == [until_eos(row[:8], EOS) for row in setup["expected"]]


def test_no_generation_config_means_the_models_ids_greedy_and_32_tokens(plain):
    assert not (plain.defaults.sampling.temperature or plain.defaults.sampling.top_k)
    assert plain.eos_token_ids == (EOS,) and plain.pad_token_id == PAD and plain.defaults.max_new_tokens == 32


def test_a_broken_generation_config_is_a_clear_error(setup, tmp_path):
    directory = tmp_path / "model"
    shutil.copytree(setup["converted"], directory)
    (directory / "generation_config.json").write_text("{not json")
    with pytest.raises(BloomJaxError, match="generation_config.json is not valid JSON"):
        Generator.from_pretrained(directory)


def test_a_null_in_generation_config_means_not_set():
    config = load_config("bloom-560m")  # eos 2, pad 3
    defaults = GenerationDefaults.from_configs(config, {"eos_token_id": None, "pad_token_id": None,
                                                        "max_new_tokens": None, "do_sample": True,
                                                        "temperature": None, "top_k": None, "top_p": None})
    assert defaults == GenerationDefaults((2,), 3, 32, Sampling(1.0, 50, 1.0, 1.0))


@pytest.mark.parametrize("key, value, says", [
    ("temperature", "hot", "temperature must be a number, got 'hot'"),
    ("top_k", 2.5, "top_k must be an integer, got 2.5"),
    ("max_new_tokens", "x", "max_new_tokens must be an integer, got 'x'"),
    ("max_new_tokens", 0, "max_new_tokens must be >= 1, got 0"),
    ("eos_token_id", [2, "3"], "eos_token_id must be an integer, got '3'"),
    ("pad_token_id", True, "pad_token_id must be an integer, got True"),
    ("do_sample", "yes", "do_sample must be true or false, got 'yes'"),
    ("top_p", 0, "top-p must be in"),
])
def test_a_wrong_value_in_generation_config_is_a_one_line_error(key, value, says):
    with pytest.raises(BloomJaxError, match=re.escape(says)):
        GenerationDefaults.from_configs(load_config("bloom-560m"), {"do_sample": True, key: value})
