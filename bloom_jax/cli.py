"""The `bloom-jax` command. Results go to stdout, logs to stderr; a user's mistake is one line and exit 2."""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from bloom_jax.errors import BloomJaxError


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (not a usage block) and exit code 2."""

    def error(self, message: str):
        raise BloomJaxError(f"{message} (see '{self.prog} --help')")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def cmd_presets(args: argparse.Namespace) -> None:
    """One line per preset: name, hidden size, layers, heads, parameter count (from abstract shapes)."""
    from bloom_jax.config import load_config, preset_names
    from bloom_jax.model import abstract_params, count_params, make_model

    for name in preset_names():
        cfg = load_config(name)
        n = count_params(abstract_params(make_model(cfg)))
        print(f"{name:15s} hidden={cfg.hidden_size:<6d} layers={cfg.n_layer:<3d} heads={cfg.n_head:<4d} "
              f"params={n:,}")


def cmd_forward(args: argparse.Namespace) -> None:
    """A jitted forward pass over random token ids; prints the next-token loss and the speed as JSON."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bloom_jax.checkpoint import from_pretrained, parse_dtype
    from bloom_jax.config import load_config, preset_names
    from bloom_jax.model import init_params, make_model

    dtype = parse_dtype(args.dtype)
    if args.model in preset_names() and not Path(args.model).exists():
        _log(f"initialising {args.model} with random weights (seed {args.seed})")
        model = make_model(load_config(args.model), dtype=dtype)
        params, source = init_params(model, jax.random.key(args.seed)), "random init"
    else:
        (model, params), source = from_pretrained(args.model, dtype=dtype), "checkpoint"
    config = model.config

    ids = np.random.default_rng(args.seed).integers(4, config.vocab_size, (args.batch, args.seq), dtype=np.int32)

    @jax.jit
    def next_token_loss(params, ids_bs):
        logits_bsv = model.apply({"params": params}, ids_bs)
        logp_bsv = jax.nn.log_softmax(logits_bsv[:, :-1], axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp_bsv, ids_bs[:, 1:, None], axis=-1))

    _log("compiling")
    start = time.perf_counter()
    loss = float(next_token_loss(params, ids))
    compile_and_run = time.perf_counter() - start
    start = time.perf_counter()
    loss = float(next_token_loss(params, ids))
    seconds = time.perf_counter() - start
    print(json.dumps({
        "model": str(args.model), "weights": source, "params": int(sum(x.size for x in jax.tree.leaves(params))),
        "dtype": dtype.name, "batch": args.batch, "seq": args.seq, "next_token_loss": round(loss, 4),
        "log_vocab": round(float(np.log(config.vocab_size)), 4), "first_call_s": round(compile_and_run, 3),
        "forward_s": round(seconds, 4), "tokens_per_s": round(args.batch * args.seq / seconds, 1),
        "devices": [str(d) for d in jax.devices()],
    }))


def cmd_convert(args: argparse.Namespace) -> None:
    """Hugging Face checkpoint (directory or hub id) -> converted checkpoint (Orbax params, config, tokenizer)."""
    from bloom_jax.checkpoint import convert

    start = time.perf_counter()
    config = convert(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite)
    print(json.dumps({"converted": str(args.src), "to": str(args.dst), "dtype": args.dtype or "float32",
                      "layers": config.n_layer, "hidden_size": config.hidden_size,
                      "seconds": round(time.perf_counter() - start, 2)}))


def cmd_export(args: argparse.Namespace) -> None:
    """Converted checkpoint -> Hugging Face directory (safetensors, sharded above --max-shard-size)."""
    from bloom_jax.checkpoint import export

    files = export(args.src, args.dst, dtype=args.dtype, max_shard_size=args.max_shard_size,
                   overwrite=args.overwrite)
    print(json.dumps({"exported": str(args.src), "to": str(args.dst), "files": files}))


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        try:
            text = sys.stdin.read() if args.prompts_file == "-" else Path(args.prompts_file).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise BloomJaxError(f"cannot read {args.prompts_file}: {getattr(e, 'strerror', None) or e}") from None
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise BloomJaxError("no prompt: give --prompt TEXT or --prompts-file FILE")
    return prompts


def _sampling_args(args: argparse.Namespace) -> dict:
    """--greedy, or sampling (at temperature 1 unless given) as soon as a sampling flag is set."""
    sampling_flags = args.temperature is not None or args.top_k is not None or args.top_p is not None
    if args.greedy and sampling_flags:
        raise BloomJaxError("--greedy cannot be combined with --temperature, --top-k or --top-p")
    temperature = args.temperature if args.temperature is not None else (1.0 if sampling_flags else 0.0)
    return {"temperature": temperature, "top_k": args.top_k or 0,
            "top_p": args.top_p if args.top_p is not None else 1.0, "repetition_penalty": args.repetition_penalty}


def cmd_generate(args: argparse.Namespace) -> None:
    """Completes prompts: text streamed to stdout, or one JSON object per prompt with --json."""
    from bloom_jax.generate import Generator, Sampling
    from bloom_jax.runtime import enable_compilation_cache, reuse_host_memory

    prompts = _read_prompts(args)
    sampling = _sampling_args(args)
    Sampling(**sampling)  # bad values fail here, before the model is loaded
    enable_compilation_cache(args.compilation_cache)
    reuse_host_memory()
    mesh = None
    if args.mesh:
        from bloom_jax.sharding import make_mesh

        mesh = make_mesh(args.mesh)
    _log(f"loading {args.checkpoint}")
    generator = Generator.from_pretrained(args.checkpoint, decode_weights=args.decode_weights, dtype=args.dtype,
                                          mesh=mesh)
    if generator.tokenizer is None:
        raise BloomJaxError(f"{args.checkpoint} has no tokenizer.json: cannot encode text prompts")
    kw = dict(max_new_tokens=args.max_new_tokens, seed=args.seed, **sampling)
    if args.json:
        for completion in generator.generate(prompts, **kw):
            print(json.dumps(completion.to_json(), ensure_ascii=False), flush=True)
        return
    # The first prompt streams live; the others (same batch) print, prompt then completion, when all are done.
    held: list[list[str]] = [[] for _ in prompts]
    _write(prompts[0])
    for piece in generator.stream(prompts, **kw):
        if piece.index == 0:
            _write(piece.text)
        else:
            held[piece.index].append(piece.text)
    _write("\n")
    for prompt, pieces in zip(prompts[1:], held[1:]):
        _write(prompt + "".join(pieces) + "\n")


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_train(args: argparse.Namespace) -> None:
    """Trains or fine-tunes from a recipe; prints the last metrics as JSON."""
    from bloom_jax.runtime import reuse_host_memory
    from bloom_jax.train import TrainConfig, Trainer

    cfg = TrainConfig.from_yaml(args.config, args.overrides)  # a bad recipe fails before JAX starts
    reuse_host_memory()
    if args.multihost or args.coordinator or args.num_processes or args.process_id is not None:
        from bloom_jax.distributed import initialize

        initialize(args.coordinator, args.num_processes, args.process_id, args.cpu_devices)
    elif args.cpu_devices:
        import jax

        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    metrics = Trainer(cfg).run()
    print(json.dumps({"output_dir": cfg.output_dir, **metrics}))


def cmd_eval(args: argparse.Namespace) -> None:
    """Perplexity of a checkpoint on text or JSONL files."""
    from bloom_jax.runtime import reuse_host_memory
    from bloom_jax.train import evaluate

    reuse_host_memory()
    result = evaluate(args.checkpoint, args.data, seq_len=args.seq_len, batch_size=args.batch_size,
                      max_batches=args.max_batches, jsonl_field=args.jsonl_field)
    print(json.dumps({"checkpoint": args.checkpoint, **result}))


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    """Trains a byte-level BPE with BLOOM's pre-tokenizer and special tokens; writes OUT/tokenizer.json."""
    from bloom_jax.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(args.files, args.vocab_size, args.jsonl_field)
    tokenizer.save(args.out)
    print(json.dumps({"tokenizer": str(Path(args.out) / "tokenizer.json"), "vocab_size": tokenizer.vocab_size}))


def cmd_plan(args: argparse.Namespace) -> None:
    """Compile a step ahead of time on simulated CPU devices and print per-device memory and FLOPs."""
    import jax

    from bloom_jax import plan
    from bloom_jax.config import load_config

    limit = plan.memory_limit_gib(args.hbm_gib, args.device)
    devices = args.devices or plan.devices_for(args.mesh)
    # Before JAX starts its backends: this process gets `devices` CPU devices to compile for.
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", devices)
    config = load_config(args.model)
    _log(f"compiling a {args.task} step of {args.model} for {devices} devices ({args.mesh})")
    result = plan.plan_step(config, args.mesh, args.task, args.batch, args.seq, rules=args.rules)
    print(json.dumps({"model": args.model, **plan.describe(result, limit)}))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bloom-jax", description="BLOOM in JAX and Flax: convert, generate, train, plan.")
    parser.add_argument("--debug", action="store_true", help="show a traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("presets", help="list the model presets and their parameter counts")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("forward", help="run a forward pass (random weights from a preset, or a checkpoint)")
    p.add_argument("model", nargs="?", default="bloom-tiny",
                   help="preset name (random weights), Hugging Face directory or hub id (default: bloom-tiny)")
    p.add_argument("--batch", type=_positive_int, default=4)
    p.add_argument("--seq", type=_positive_int, default=64)
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_forward)

    p = sub.add_parser("convert", help="convert a Hugging Face BLOOM checkpoint to a sharded Orbax checkpoint")
    p.add_argument("src", help="Hugging Face directory (any layout) or hub id such as bigscience/bloom-560m")
    p.add_argument("dst", help="output directory or URL (gs://...); must be empty unless --overwrite")
    p.add_argument("--dtype", default=None, help="stored dtype: float32 (default), bfloat16 or float16")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="export a converted checkpoint as a Hugging Face directory (safetensors)")
    p.add_argument("src", help="converted checkpoint (directory or URL)")
    p.add_argument("dst", help="output directory; must be empty unless --overwrite")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as stored)")
    p.add_argument("--max-shard-size", default="5GB", help="split into shards above this size (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="complete prompts with a checkpoint (streams text, or --json lines)")
    p.add_argument("checkpoint", help="converted checkpoint, Hugging Face directory or hub id")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    p.add_argument("--prompts-file", help="a file of prompts, one per line ('-' for stdin)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=32)
    p.add_argument("--greedy", action="store_true", help="always the most likely token (the default)")
    p.add_argument("--temperature", type=_float, default=None, help="sample at this temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=_float, default=None, help="sample among the most likely tokens of mass p")
    p.add_argument("--repetition-penalty", type=_float, default=1.0, help="as transformers (1: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mesh", default=None, help="mesh spec to shard the weights over, e.g. tensor=4")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    p.add_argument("--decode-weights", choices=("float32", "bfloat16", "int8"), default="float32",
                   help="weight format for decoding (float32: exact; bfloat16, int8: smaller and faster)")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt per line")
    p.add_argument("--compilation-cache", default=None,
                   help="JAX persistent compilation cache directory (default: $BLOOM_JAX_COMPILATION_CACHE)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("train", help="train or fine-tune from a recipe (configs/train/*.yaml) with overrides")
    p.add_argument("config", help="recipe YAML, or the name of one in configs/train (e.g. quickstart)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe settings to override (YAML values)")
    p.add_argument("--multihost", action="store_true", help="join a multi-host run found automatically (TPU pod)")
    p.add_argument("--coordinator", default=None, help="multi-host: host:port of process 0")
    p.add_argument("--num-processes", type=_positive_int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--cpu-devices", type=_positive_int, default=None, help="simulate this many CPU devices")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="perplexity of a checkpoint on text or JSONL files")
    p.add_argument("checkpoint", help="converted checkpoint (e.g. a training run's final/), HF dir or hub id")
    p.add_argument("--data", nargs="+", required=True, help="text/JSONL files, directories or globs")
    p.add_argument("--seq-len", type=_positive_int, default=512)
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--max-batches", type=_positive_int, default=None)
    p.add_argument("--jsonl-field", default="text")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tokenizer_sub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", parser_class=_Parser,
                                     required=True)
    t = tokenizer_sub.add_parser("train", help="train a byte-level BPE with BLOOM's pre-tokenizer")
    t.add_argument("files", nargs="+", help="text/JSONL files, directories or globs")
    t.add_argument("--vocab-size", type=_positive_int, default=8192)
    t.add_argument("--jsonl-field", default="text")
    t.add_argument("--out", required=True, help="directory to write tokenizer.json into")
    t.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser("plan", help="per-device memory and FLOPs of a step, compiled on simulated devices")
    p.add_argument("--model", required=True, help="preset name or config.json path")
    p.add_argument("--mesh", required=True, help="mesh spec, e.g. data=4,fsdp=32,tensor=4")
    p.add_argument("--task", choices=("train", "forward", "generate"), default="train")
    p.add_argument("--batch", type=_positive_int, default=None, help="global batch (default: the data axes)")
    p.add_argument("--seq", type=_positive_int, default=2048)
    p.add_argument("--rules", default="fsdp_tensor", help="sharding rules preset (configs/sharding)")
    p.add_argument("--devices", type=_positive_int, default=None, help="device count, if the mesh uses -1")
    p.add_argument("--hbm-gib", type=float, default=None, help="per-device memory to check against, GiB")
    p.add_argument("--device", default=None, help="or a known accelerator: v4, v5e, v5p, v6e, h100")
    p.set_defaults(func=cmd_plan)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return 0
        args.func(args)
    except BloomJaxError as e:
        if debug:
            traceback.print_exc()
        print(f"bloom-jax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bloom-jax: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
