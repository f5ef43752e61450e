"""The optimized HLO of every program the CPU benchmarks time, as op counts: to check that a change leaves them
op for op as they were.

    python benchmarks/hlo_ops.py > after.json                   # compile them all (about 5 minutes on 2 cores)
    python benchmarks/hlo_ops.py --compare before.json after.json

Each program is compiled by XLA:CPU from abstract inputs (no weights are made) at the benchmarks' shapes:
`forward.py` (bloom-560m, scanned and unrolled, 8 x 128 and 1 x 128), `train.py` (the unrolled training step
at 1 x 512), `generate.py` (prefill and decode loop of each decode weight format at batch 1 and 8, prompt 32,
64 new tokens, and the 1-token runs), `serve.py` (the server's decode step at 1 to 16 busy slots of 256
positions, and its prefill, slot insertion and first tokens at the prompt buckets `warm_up` compiles) and
`attention.py` (reference and blockwise, forward and backward). For each it prints the count of every HLO
opcode (the fused computations' instructions included) and the fusion kinds; `--compare` names the programs
whose counts differ, and exits 1 if any does.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import log  # noqa: E402

# "%name = SHAPE opcode(" (a tuple shape holds spaces but never "word(").
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*.*?\s([a-z][a-z0-9\-]*)\(")
_FUSION_KIND = re.compile(r"kind=(k\w+)")


def op_counts(hlo_text: str) -> dict[str, int]:
    counts: collections.Counter = collections.Counter()
    for line in hlo_text.splitlines():
        found = _INSTRUCTION.match(line)
        if found:
            counts[found[1]] += 1
            if found[1] == "fusion":
                kind = _FUSION_KIND.search(line)
                counts[f"fusion:{kind[1] if kind else '?'}"] += 1
    return dict(sorted(counts.items()))


def abstract(tree):
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def compiled_ops(fn, *args, **static) -> dict[str, int]:
    import jax

    return op_counts(jax.jit(fn, **static).lower(*args).compile().as_text())


def programs(only: str | None):
    """(name, thunk giving op counts) of every benchmarked program."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bloom_jax.config import load_config
    from bloom_jax.model import abstract_params, make_model, unstack_layers
    from bloom_jax.weights import to_decode_weights

    config = load_config("bloom-560m")
    scanned = make_model(config)
    unrolled = make_model(config, scan_layers=False)
    params_scanned = nn.unbox(abstract_params(scanned))
    params_unrolled = jax.eval_shape(unstack_layers, params_scanned)
    ids = lambda b, s: jax.ShapeDtypeStruct((b, s), jnp.int32)  # noqa: E731

    found = []

    def add(name, thunk):
        if only is None or re.search(only, name):
            found.append((name, thunk))

    # benchmarks/forward.py
    for layout, model, params in (("scanned", scanned, params_scanned), ("unrolled", unrolled, params_unrolled)):
        for b, s in ((8, 128), (1, 128)):
            add(f"forward {layout} {b}x{s}", lambda m=model, p=params, b=b, s=s: compiled_ops(
                lambda p, i: m.apply({"params": p}, i), p, ids(b, s)))

    # benchmarks/train.py
    def train():
        from bloom_jax.recipe import TrainConfig
        from bloom_jax.train import make_optimizer, train_step

        cfg = TrainConfig(batch_size=1, seq_len=512, learning_rate=1e-4)
        optimizer = make_optimizer(cfg)
        state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params_unrolled,
                 "opt_state": jax.eval_shape(optimizer.init, params_unrolled)}
        return compiled_ops(lambda s, t: train_step(unrolled, optimizer, 1, 0, False, s, t), state, ids(1, 513),
                            donate_argnums=0)

    add("train step unrolled 1x512", train)

    # benchmarks/generate.py: the Generator's layout on CPU (unrolled), greedy, EOS off.
    from bloom_jax.generate import decode, prefill
    from bloom_jax.sampling import Sampling

    def generation(weights, batch, new):
        model = unrolled.clone(decode_weights=weights)
        params = jax.eval_shape(lambda p: to_decode_weights(p, weights), params_unrolled)
        args = (params, ids(batch, 32), ids(batch, 32), jax.ShapeDtypeStruct((batch,), jnp.bool_),
                jax.random.key(0), jax.ShapeDtypeStruct((1,), jnp.int32))
        pre = jax.jit(prefill, static_argnames=("model", "sampling", "new_tokens")).lower(
            model, *args, 3, Sampling(), new).compile()
        state = jax.eval_shape(lambda *a: prefill(model, *a, 3, Sampling(), new), *args)
        dec = decode.lower(model, params, state, new, Sampling()).compile()
        return {"prefill": op_counts(pre.as_text()), "decode": op_counts(dec.as_text())}

    for weights in ("float32", "bfloat16", "int8"):
        for batch in (1, 8):
            for new in (64, 1):
                add(f"generate {weights} batch {batch} new {new}",
                    lambda w=weights, b=batch, n=new: generation(w, b, n))

    # benchmarks/serve.py: 16 slots of 256 positions, float32 decode weights, greedy rows, logprobs 0.
    def serving():
        from bloom_jax.sampling import Features, RowSampling
        from bloom_jax.serving import batch as device

        model = make_model(config).clone(decode_weights="float32", scan_layers=False)
        params = jax.eval_shape(lambda p: to_decode_weights(p, "float32"), params_unrolled)
        slots, seen = jax.eval_shape(lambda: device.new_slots(model, 16, 256))
        out = {}

        def greedy(rows):
            return RowSampling(np.zeros(rows, np.float32), np.zeros(rows, np.int32), np.ones(rows, np.float32),
                               np.ones(rows, np.float32), np.zeros((rows, 2), np.uint32), np.zeros(rows, np.int32))

        for rows in (1, 2, 4, 8, 16):
            out[f"decode_step {rows}"] = op_counts(device.decode_step.lower(
                model, params, slots, seen, np.zeros(rows, np.int32), greedy(rows), Features(), False
            ).compile().as_text())
        for length in (16, 32, 64):
            group = 1
            while group <= 16 and group * length <= 256:
                cache = jax.eval_shape(lambda g=group, n=length: device.new_prefill_cache(model, g, n))
                chunk = ids(group, length)
                out[f"prefill_chunk {group}x{length}"] = op_counts(device.prefill_chunk.lower(
                    model, params, cache, chunk, chunk, chunk, False).compile().as_text())
                scalar = jax.ShapeDtypeStruct((), jnp.int32)
                out[f"insert {group}x{length}"] = op_counts(device.insert.lower(
                    slots, seen, cache, chunk, scalar, scalar, scalar).compile().as_text())
                out[f"first_tokens {group}"] = op_counts(device.first_tokens.lower(
                    model.resolved_kernels, jax.ShapeDtypeStruct((group, config.vocab_size), jnp.float32),
                    np.arange(group, dtype=np.int32), seen, np.arange(group, dtype=np.int32), greedy(group),
                    Features(), False).compile().as_text())
                group *= 2
        return out

    add("serve", serving)

    # benchmarks/attention.py: 16 heads of 64, fp32, causal, one left-padded row.
    def attention(impl, b, s):
        from bloom_jax.kernels import attention as attn

        n, h = 16, 64
        qkv = [jax.ShapeDtypeStruct((b, n, s, h), jnp.float32)] * 3
        mask_bs = np.ones((b, s), np.int32)
        mask_bs[0, : s // 8] = 0

        def loss(q, k, v, cotangent):
            mask = attn.AttentionMask.create(jnp.asarray(mask_bs), n, s, 0, impl == "reference")
            if impl == "reference":
                out = attn.reference(q, k, v, mask, jnp.float32)
            else:
                out = attn.blockwise(q, k, v, mask, jnp.float32, 512, 512)
            return jnp.sum(out * cotangent)

        return compiled_ops(jax.grad(loss, argnums=(0, 1, 2)), *qkv, qkv[0])

    for b, s in ((8, 128), (1, 512), (8, 512), (1, 1024), (1, 2048)):
        for impl in ("reference", "blockwise"):
            add(f"attention {impl} {b}x{s}", lambda i=impl, b=b, s=s: attention(i, b, s))
    return found


def compare(before_path: str, after_path: str) -> int:
    with open(before_path) as f:
        before = json.load(f)
    with open(after_path) as f:
        after = json.load(f)
    differ = 0
    for name in sorted(set(before) | set(after)):
        if name not in before or name not in after:
            print(f"{name}: only in {'after' if name in after else 'before'}")
            differ += 1
            continue
        if before[name] != after[name]:
            differ += 1
            print(f"{name}: differs")
            flat_b = _flatten(before[name])
            flat_a = _flatten(after[name])
            for key in sorted(set(flat_b) | set(flat_a)):
                if flat_b.get(key) != flat_a.get(key):
                    print(f"  {key}: {flat_b.get(key)} -> {flat_a.get(key)}")
    print(f"{len(set(before) | set(after)) - differ} programs the same op for op, {differ} different")
    return 1 if differ else 0


def _flatten(tree, prefix=""):
    if not isinstance(tree, dict) or all(isinstance(v, int) for v in tree.values()):
        return {f"{prefix}{k}": v for k, v in tree.items()} if isinstance(tree, dict) else {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}/"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="a regular expression: only the programs whose names match")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="compare two outputs")
    args = parser.parse_args()
    if args.compare:
        raise SystemExit(compare(*args.compare))
    results = {}
    for name, thunk in programs(args.only):
        start = time.perf_counter()
        results[name] = thunk()
        log(f"{name}: {time.perf_counter() - start:.0f} s")
    json.dump(results, sys.stdout, indent=1, sort_keys=True)
    print()


if __name__ == "__main__":
    main()
