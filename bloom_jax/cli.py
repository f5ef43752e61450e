"""The `bloom-jax` command. Results go to stdout, logs to stderr.

Exit status: 0 done, 1 a run that failed (a training loss that became NaN), 2 a usage or input mistake (one
line on stderr; `--debug` adds the traceback), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM; train saves a
checkpoint and stops cleanly instead, serve shuts down).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from bloom_jax import storage
from bloom_jax.errors import BloomJaxError, RunFailed, Terminated
from bloom_jax.log import get_logger

log = get_logger("bloom_jax.cli")  # not __name__: `python -m bloom_jax.cli` runs it as __main__


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (not a usage block) and exit code 2."""

    def error(self, message: str):
        raise BloomJaxError(f"{message} (see '{self.prog} --help')")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default, when it has one worth saying."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or default is None or default is False or default == argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


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
    import numpy as np

    from bloom_jax.checkpoints import from_pretrained
    from bloom_jax.config import load_config, parse_dtype, preset_names
    from bloom_jax.losses import next_token_loss
    from bloom_jax.model import init_params, make_model

    dtype = parse_dtype(args.dtype)
    if args.model in preset_names() and not Path(args.model).exists():
        log.info(f"initialising {args.model} with random weights (seed {args.seed})")
        model = make_model(load_config(args.model), dtype=dtype, kernels=args.kernels, attention=args.attention)
        params, source = init_params(model, jax.random.key(args.seed)), "random init"
    else:
        (model, params), source = from_pretrained(args.model, dtype=dtype, kernels=args.kernels,
                                                  attention=args.attention), "checkpoint"
    config = model.config

    # One more token than --seq: the model reads --seq of them and predicts each next one.
    tokens = np.random.default_rng(args.seed).integers(4, config.vocab_size, (args.batch, args.seq + 1),
                                                        dtype=np.int32)
    loss_fn = jax.jit(lambda params, tokens: next_token_loss(model, params, tokens))
    log.info("compiling")
    start = time.perf_counter()
    loss = float(loss_fn(params, tokens))
    compile_and_run = time.perf_counter() - start
    start = time.perf_counter()
    loss = float(loss_fn(params, tokens))
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
    from bloom_jax.checkpoints import convert

    start = time.perf_counter()
    config = convert(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite)
    print(json.dumps({"converted": str(args.src), "to": str(args.dst), "dtype": args.dtype,
                      "layers": config.n_layer, "hidden_size": config.hidden_size,
                      "seconds": round(time.perf_counter() - start, 2)}))


def cmd_export(args: argparse.Namespace) -> None:
    """Converted checkpoint -> Hugging Face directory (safetensors, sharded above --max-shard-size)."""
    from bloom_jax.checkpoints import export

    files = export(args.src, args.dst, dtype=args.dtype, max_shard_size=args.max_shard_size,
                   overwrite=args.overwrite)
    print(json.dumps({"exported": str(args.src), "to": str(args.dst), "files": files}))


def cmd_export_adapter(args: argparse.Namespace) -> None:
    """A LoRA run's checkpoint -> a peft adapter directory."""
    from bloom_jax.train import export_run_adapter

    step = export_run_adapter(args.run_dir, args.dst, step=args.step, overwrite=args.overwrite)
    print(json.dumps({"exported": str(args.run_dir), "step": step, "to": str(args.dst)}))


def cmd_merge(args: argparse.Namespace) -> None:
    """Base + LoRA adapter -> one checkpoint with the adapter folded in."""
    from bloom_jax.checkpoints.peft import merge_adapter

    merge_adapter(args.base, args.adapter, args.dst, hugging_face=args.hf, dtype=args.dtype,
                  overwrite=args.overwrite)
    print(json.dumps({"merged": str(args.adapter), "into": str(args.base), "to": str(args.dst),
                      "format": "hugging_face" if args.hf else "converted"}))


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        try:
            if args.prompts_file == "-":
                text = sys.stdin.read()
            elif storage.is_remote(args.prompts_file):
                data = storage.read_bytes(args.prompts_file)
                if data is None:
                    raise BloomJaxError(f"cannot read {args.prompts_file}: no such file")
                text = data.decode()
            else:
                text = Path(args.prompts_file).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise BloomJaxError(f"cannot read {args.prompts_file}: {getattr(e, 'strerror', None) or e}") from None
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise BloomJaxError("no prompt: give --prompt TEXT or --prompts-file FILE")
    return prompts


def _sampling_args(args: argparse.Namespace) -> dict:
    """The sampling flags given (the others come from the checkpoint's generation_config.json, else greedy).
    --greedy forces temperature 0; a sampling flag without --temperature samples at temperature 1 unless the
    checkpoint's own default samples."""
    sampling = {"top_k": args.top_k, "top_p": args.top_p, "repetition_penalty": args.repetition_penalty}
    sampling = {key: value for key, value in sampling.items() if value is not None}
    if args.greedy:
        if args.temperature is not None or "top_k" in sampling or "top_p" in sampling:
            raise BloomJaxError("--greedy cannot be combined with --temperature, --top-k or --top-p")
        sampling["temperature"] = 0.0
    elif args.temperature is not None:
        sampling["temperature"] = args.temperature
    return sampling


def _load_generator(args: argparse.Namespace):
    """The `Generator` of `generate` and `serve`: the checkpoint with its decode weights, mesh and adapter, and
    a tokenizer (required)."""
    from bloom_jax.generate import Generator
    from bloom_jax.runtime import enable_compilation_cache, reuse_host_memory

    enable_compilation_cache(args.compilation_cache)
    reuse_host_memory()
    mesh = None
    if args.mesh:
        from bloom_jax.sharding import make_mesh

        mesh = make_mesh(args.mesh)
    draft, lookup = args.draft, args.prompt_lookup
    if draft is not None and lookup is not None:
        raise BloomJaxError("--draft and --prompt-lookup are two ways to draft: give one")
    log.info(f"loading {args.checkpoint}" + (f" and the draft {draft}" if draft else ""))
    generator = Generator.from_pretrained(args.checkpoint, decode_weights=args.decode_weights, dtype=args.dtype,
                                          mesh=mesh, kernels=args.kernels, attention=args.attention,
                                          adapter=args.adapter, merge_adapter=not args.unmerged, draft=draft,
                                          draft_tokens=args.draft_tokens, prompt_lookup=lookup or 0)
    if generator.tokenizer is None:
        raise BloomJaxError(f"{args.checkpoint} has no tokenizer.json: cannot encode text prompts")
    return generator


def cmd_serve(args: argparse.Namespace) -> None:
    """Serves a checkpoint over HTTP with OpenAI's API until SIGINT or SIGTERM."""
    import os

    from bloom_jax.checkpoints import read_side_file
    from bloom_jax.serving.app import Server, serve
    from bloom_jax.chat import ChatTemplate
    from bloom_jax.serving.engine import Engine, EngineStopped

    api_key = args.api_key or os.environ.get("BLOOM_JAX_API_KEY") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        log.warning(f"serving on {args.host} without an API key: anyone who reaches it can use it")
    template = ChatTemplate.load(args.chat_template, None)  # a bad --chat-template fails before loading
    _check_can_listen(args.host, args.port)
    generator = _load_generator(args)
    if generator.max_length is not None and args.max_length > generator.max_length:
        raise BloomJaxError(f"--max-length {args.max_length} is beyond the model's length limit of "
                            f"{generator.max_length} tokens")
    template = ChatTemplate.load(args.chat_template, read_side_file(args.checkpoint, "tokenizer_config.json"))
    if template is None:
        log.info("no chat template (the tokenizer config has none, and no --chat-template): "
                 "/v1/chat/completions will refuse requests")
    engine = Engine(generator, max_slots=args.max_slots, max_length=args.max_length, max_queue=args.max_queue,
                    chunk=args.prefill_chunk, prefill_tokens=args.prefill_batch_tokens)
    log.info(f"compiling ({args.max_slots} slots of {args.max_length} positions: a KV cache of "
             f"{engine.cache_bytes / 2**30:.2f} GiB)")
    try:
        engine.warm_up()  # and starts it
    except EngineStopped as e:
        raise RunFailed(f"the engine failed to start: {e}") from None
    server = Server(engine, args.served_model_name or str(args.checkpoint), template, api_key, args.max_prompts)
    serve(server, args.host, args.port, on_ready=lambda url: log.info(f"serving {server.limits.model} at {url}"))


def _check_can_listen(host: str, port: int) -> None:
    """A one-line error now, not after loading the model, when the address is taken or not ours."""
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as e:
        raise BloomJaxError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def cmd_generate(args: argparse.Namespace) -> None:
    """Completes prompts: text streamed to stdout, or one JSON object per prompt with --json."""
    prompts = _read_prompts(args)  # before JAX loads: a Ctrl-C while it waits for stdin is a clean stop
    from bloom_jax.generate import Sampling

    sampling = _sampling_args(args)
    Sampling(**sampling)  # bad values fail here, before the model is loaded
    generator = _load_generator(args)
    if sampling.keys() & {"top_k", "top_p"} and "temperature" not in sampling and generator.defaults.sampling.greedy:
        sampling["temperature"] = 1.0  # a sampling flag alone samples
    kw = dict(max_new_tokens=args.max_new_tokens, seed=args.seed, **sampling)
    if args.json:
        for completion in generator.generate(prompts, **kw):
            line = completion.to_json()
            if generator.speculation is not None:  # the batch's, on each line
                line["speculative"] = generator.last_stats
            print(json.dumps(line, ensure_ascii=False), flush=True)
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
    if generator.speculation is not None:
        stats = generator.last_stats
        log.info(f"speculative decoding: {stats['accepted_tokens']} of {stats['drafted_tokens']} drafted tokens "
                 f"accepted ({stats['acceptance_rate']:.0%}), {stats['tokens_per_round']:.2f} tokens per pass")


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_train(args: argparse.Namespace) -> None:
    """Trains or fine-tunes from a recipe; prints the last metrics as JSON."""
    from bloom_jax.recipe import TrainConfig

    cfg = TrainConfig.from_yaml(args.config, args.overrides)  # a bad recipe fails before JAX is imported
    from bloom_jax.runtime import reuse_host_memory
    from bloom_jax.train import Trainer

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
    """Perplexity of a checkpoint on text or JSONL files; on instruction data, the loss on the answers."""
    from bloom_jax.runtime import reuse_host_memory
    from bloom_jax.sft import Fields
    from bloom_jax.train import evaluate

    reuse_host_memory()
    fields = Fields(prompt=args.prompt_field, completion=args.completion_field, messages=args.messages_field)
    result = evaluate(args.checkpoint, args.data, seq_len=args.seq_len, batch_size=args.batch_size,
                      max_batches=args.max_batches, jsonl_field=args.jsonl_field, data_format=args.data_format,
                      fields=fields, chat_template=args.chat_template)
    print(json.dumps({"checkpoint": args.checkpoint, **result}))


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    """Trains a byte-level BPE with BLOOM's pre-tokenizer and special tokens; writes OUT/tokenizer.json."""
    from bloom_jax.data import iter_documents
    from bloom_jax.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(iter_documents(args.files, args.jsonl_field), args.vocab_size)
    print(json.dumps({"tokenizer": tokenizer.save(args.out), "vocab_size": tokenizer.vocab_size}))


def cmd_plan(args: argparse.Namespace) -> None:
    """Compile a step ahead of time on simulated CPU devices and print per-device memory and FLOPs."""
    import jax

    from bloom_jax import plan
    from bloom_jax.config import load_config
    from bloom_jax.devices import accelerator

    limit = plan.memory_limit_gib(args.hbm_gib, args.device)
    devices = args.devices or plan.devices_for(args.mesh)
    tpu = None
    if args.device is not None and accelerator(args.device).name in plan.TPU_TOPOLOGIES:
        tpu = accelerator(args.device).name
    if args.compiler == "xla-cpu" or (tpu is not None and not plan.tpu_compiler_available()):
        if tpu is not None and args.compiler == "tpu":
            raise BloomJaxError("plan: the TPU compiler needs libtpu (pip install 'bloom-jax[tpu]')")
        if tpu is not None and args.compiler == "auto":
            log.info("libtpu is not installed (pip install 'bloom-jax[tpu]'): XLA:CPU stands in for the TPU compiler")
        tpu = None
    elif args.compiler == "tpu" and tpu is None:
        raise BloomJaxError("plan: --compiler tpu needs --device v4, v5e, v5p or v6e")
    # Before JAX starts its backends: this process gets `devices` CPU devices to compile for (or, for the TPU
    # compiler, none beyond the host's: the slice's devices come from libtpu's topology).
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", 1 if tpu else devices)
    config = load_config(args.model)
    target = f"{devices} {tpu} chips" if tpu else f"{devices} devices"
    log.info(f"compiling a {args.task} step of {args.model} for {target} ({args.mesh})")
    lora = None
    if args.lora_rank:
        from bloom_jax.lora import LoraConfig

        if args.task != "train":
            raise BloomJaxError("plan: --lora-rank plans a train step (--task train)")
        lora = LoraConfig(rank=args.lora_rank, targets=tuple(args.lora_targets.split(",")))
    result = plan.plan_step(config, args.mesh, args.task, args.batch, args.seq, rules=args.rules, tpu=tpu,
                            chips=devices, kernels=args.kernels, attention=args.attention,
                            remat_policy=args.remat_policy, lora=lora, lora_base=args.lora_base,
                            scan_layers=args.layers == "scanned", loss_chunk_tokens=args.loss_chunk_tokens,
                            packed=args.packed, draft=load_config(args.draft_model) if args.draft_model else None,
                            draft_tokens=args.draft_tokens, decode_weights=args.decode_weights)
    print(json.dumps({"model": args.model, **plan.describe(result, limit)}))


def _recipe_epilog() -> str:
    from bloom_jax.recipe import recipe_keys

    return "recipe keys (set in the recipe or as KEY=VALUE, values in YAML):\n" + "\n".join(
        f"  {line}" for line in recipe_keys())


def build_parser() -> argparse.ArgumentParser:
    from bloom_jax import __version__

    # --debug is accepted before and after the command; SUPPRESS keeps a subcommand from resetting the other.
    debug = _Parser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show a traceback on errors")
    parser = _Parser(prog="bloom-jax", description="BLOOM in JAX and Flax: convert, generate, train, plan.",
                     parents=[debug], formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"bloom-jax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def command(name: str, help: str, func=None, **kwargs) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=[debug], formatter_class=_HelpFormatter,
                           **kwargs)
        if func is not None:
            p.set_defaults(func=func)
        return p

    command("presets", "list the model presets and their parameter counts", cmd_presets)

    p = command("forward", "run a forward pass (random weights from a preset, or a checkpoint)", cmd_forward)
    p.add_argument("model", nargs="?", default="bloom-tiny",
                   help="preset name (random weights), converted checkpoint, Hugging Face directory or hub id")
    p.add_argument("--batch", type=_positive_int, default=4, help="sequences")
    p.add_argument("--seq", type=_positive_int, default=64, help="tokens per sequence")
    p.add_argument("--dtype", default="float32", help="compute dtype: float32, bfloat16 or float16")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and token ids")
    _kernel_flags(p)

    p = command("convert", "convert a Hugging Face BLOOM checkpoint to a sharded Orbax checkpoint", cmd_convert)
    p.add_argument("src", help="Hugging Face directory (any layout) or hub id such as bigscience/bloom-560m")
    p.add_argument("dst", help="output directory or URL (gs://...); must be empty unless --overwrite")
    p.add_argument("--dtype", default="float32", help="stored dtype: float32, bfloat16 or float16")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")

    p = command("export", "export a converted checkpoint as a Hugging Face directory (safetensors)", cmd_export)
    p.add_argument("src", help="converted checkpoint (directory or URL)")
    p.add_argument("dst", help="output directory or URL (gs://...); must be empty unless --overwrite")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as stored)")
    p.add_argument("--max-shard-size", default="5GB", help="split into shards above this size")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")

    p = command("export-adapter", "write a LoRA run's adapters in peft's format", cmd_export_adapter)
    p.add_argument("run_dir", help="the output_dir of a LoRA training run (directory or URL)")
    p.add_argument("dst", help="output directory or URL (gs://...); must be empty unless --overwrite")
    p.add_argument("--step", type=_positive_int, default=None, help="the checkpoint's step (default: the newest)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")

    p = command("merge", "fold a LoRA adapter into its base and write one checkpoint", cmd_merge)
    p.add_argument("base", help="the base: converted checkpoint, Hugging Face directory or hub id")
    p.add_argument("adapter", help="a peft LoRA adapter: directory, URL or hub id")
    p.add_argument("dst", help="output directory or URL (gs://...); must be empty unless --overwrite")
    p.add_argument("--hf", action="store_true", help="write a Hugging Face directory instead of a converted one")
    p.add_argument("--dtype", default="float32", help="stored dtype: float32, bfloat16 or float16")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")

    p = command("generate", "complete prompts with a checkpoint (streams text, or --json lines)", cmd_generate)
    p.add_argument("checkpoint", help="converted checkpoint (directory or URL), Hugging Face directory or hub id")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    p.add_argument("--prompts-file", help="a file of prompts, one per line ('-' for stdin)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=None,
                   help="new tokens per prompt (default: the checkpoint's generation_config.json, else 32)")
    p.add_argument("--greedy", action="store_true",
                   help="always the most likely token (the default, unless generation_config.json samples)")
    p.add_argument("--temperature", type=_float, default=None, help="sample at this temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=_float, default=None, help="sample among the most likely tokens of mass p")
    p.add_argument("--repetition-penalty", type=_float, default=None, help="as transformers' (1: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt per line")
    _decoding_flags(p)
    _speculation_flags(p)

    p = command("serve", "serve a checkpoint over HTTP with OpenAI's API (completions, chat), batching requests",
                cmd_serve)
    p.add_argument("checkpoint", help="converted checkpoint (directory or URL), Hugging Face directory or hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--max-slots", type=_positive_int, default=8,
                   help="sequences decoded together (each holds a KV cache of --max-length positions)")
    p.add_argument("--max-length", type=_positive_int, default=1024, help="prompt plus new tokens, at most")
    p.add_argument("--max-queue", type=_positive_int, default=256,
                   help="requests waiting for a slot before new ones get 429")
    p.add_argument("--prefill-chunk", type=_positive_int, default=512,
                   help="longer prompts are prefilled this many tokens at a time, between decode steps")
    p.add_argument("--prefill-batch-tokens", type=_positive_int, default=256,
                   help="waiting prompts are prefilled together up to this many (padded) tokens")
    p.add_argument("--max-prompts", type=_positive_int, default=64,
                   help="prompts one completions request may hold (each is queued as a request of its own)")
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: CHECKPOINT)")
    p.add_argument("--chat-template", default=None,
                   help="a Jinja chat template (a file, or its text) for /v1/chat/completions (default: the "
                        "tokenizer config's)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: "
                        "$BLOOM_JAX_API_KEY; none: no key)")
    _decoding_flags(p)
    _speculation_flags(p)

    p = command("train", "train or fine-tune from a recipe (configs/train/*.yaml) with overrides", cmd_train,
                epilog=_recipe_epilog())
    p.add_argument("config", help="recipe YAML, or the name of one in configs/train (e.g. quickstart)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe settings to override (YAML values)")
    p.add_argument("--multihost", action="store_true", help="join a multi-host run found automatically (TPU pod)")
    p.add_argument("--coordinator", default=None, help="multi-host: host:port of process 0")
    p.add_argument("--num-processes", type=_positive_int, default=None, help="multi-host: how many processes")
    p.add_argument("--process-id", type=int, default=None, help="multi-host: this process's index, from 0")
    p.add_argument("--cpu-devices", type=_positive_int, default=None, help="simulate this many CPU devices")

    p = command("eval", "perplexity of a checkpoint on text or JSONL files (instruction data: on the answers)",
                cmd_eval)
    p.add_argument("checkpoint", help="converted checkpoint (e.g. a training run's final/; directory or URL), HF "
                   "dir or hub id")
    p.add_argument("--data", nargs="+", required=True, help="text/JSONL files, directories or globs (paths or URLs)")
    p.add_argument("--seq-len", type=_positive_int, default=512, help="tokens per scored window")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="windows per batch")
    p.add_argument("--max-batches", type=_positive_int, default=None, help="stop after this many (default: all)")
    p.add_argument("--jsonl-field", default="text", help="the field of a JSONL line that holds its document")
    p.add_argument("--data-format", default="auto", choices=("auto", "text", "prompt_completion", "chat"),
                   help="text, or instruction data scored on its answers (auto: what the files' first lines hold)")
    p.add_argument("--prompt-field", default="prompt", help="prompt_completion: the prompt's field (xP3's "
                   "inputs/targets are found too)")
    p.add_argument("--completion-field", default="completion", help="prompt_completion: the answer's field")
    p.add_argument("--messages-field", default="messages", help="chat: the conversation's field")
    p.add_argument("--chat-template", default=None, help="chat: a Jinja template, file or URL (default: the "
                   "checkpoint's tokenizer config's)")

    p = command("tokenizer", "tokenizer tools")
    tokenizer_sub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", parser_class=_Parser,
                                     required=True)
    t = tokenizer_sub.add_parser("train", help="train a byte-level BPE with BLOOM's pre-tokenizer",
                                 parents=[debug], formatter_class=_HelpFormatter)
    t.add_argument("files", nargs="+", help="text/JSONL files, directories or globs")
    t.add_argument("--vocab-size", type=_positive_int, default=8192, help="tokens in the vocabulary")
    t.add_argument("--jsonl-field", default="text", help="the field of a JSONL line that holds its document")
    t.add_argument("--out", required=True, help="directory to write tokenizer.json into")
    t.set_defaults(func=cmd_tokenizer_train)

    p = command("plan", "per-device memory and FLOPs of a step, compiled on simulated devices", cmd_plan)
    p.add_argument("--model", required=True, help="preset name or config.json path")
    p.add_argument("--mesh", required=True, help="mesh spec, e.g. data=4,fsdp=32,tensor=4")
    p.add_argument("--task", choices=("train", "forward", "generate", "speculate"), default="train",
                   help="the step (speculate: a round of speculative decoding, with --draft-model)")
    p.add_argument("--batch", type=_positive_int, default=None,
                   help="global batch (default: one sequence per data shard)")
    p.add_argument("--seq", type=_positive_int, default=2048, help="sequence length (generate: KV cache length)")
    p.add_argument("--rules", default="fsdp_tensor", help="sharding rules preset (configs/sharding)")
    p.add_argument("--devices", type=_positive_int, default=None, help="device count, if the mesh uses -1")
    p.add_argument("--hbm-gib", type=float, default=None, help="per-device memory to check against, GiB")
    p.add_argument("--device", default=None, help="or a known accelerator: v4, v5e, v5p, v6e, h100, h200")
    p.add_argument("--compiler", choices=("auto", "tpu", "xla-cpu"), default="auto",
                   help="who compiles the step: auto (the TPU compiler for a TPU --device when libtpu is installed, "
                        "else XLA:CPU as a stand-in)")
    p.add_argument("--remat-policy", choices=("none", "full", "dots", "dots_no_batch"), default="full",
                   help="activation checkpointing of the train step")
    p.add_argument("--layers", choices=("scanned", "unrolled"), default="scanned",
                   help="the blocks under one scan, or one by one (the recipe key scan_layers)")
    p.add_argument("--loss-chunk-tokens", type=_positive_int, default=1024,
                   help="tokens per device whose logits the loss makes at once")
    p.add_argument("--lora-rank", type=_positive_int, default=None,
                   help="plan a LoRA fine-tune: adapters of this rank, the base frozen")
    p.add_argument("--lora-targets", default="query_key_value,dense,dense_h_to_4h,dense_4h_to_h",
                   help="comma-separated layers given adapters")
    p.add_argument("--lora-base", choices=("bfloat16", "float32", "int8", "nf4"), default="bfloat16",
                   help="how the frozen base is stored (int8, nf4: QLoRA)")
    p.add_argument("--packed", action="store_true",
                   help="plan the step of packed instruction rows (a loss mask and segment ids: SFT)")
    p.add_argument("--draft-model", default=None,
                   help="--task speculate: the draft's preset or config.json (e.g. bloom-560m for bloom-7b1)")
    p.add_argument("--draft-tokens", type=_positive_int, default=4, help="--task speculate: tokens drafted a round")
    p.add_argument("--decode-weights", choices=("float32", "bfloat16", "int8"), default=None,
                   help="--task generate or speculate: the weights' decode format (default: bf16 weights)")
    _kernel_flags(p)
    return parser


def _decoding_flags(p: argparse.ArgumentParser) -> None:
    """How `generate` and `serve` load and decode a checkpoint (`_load_generator` reads them)."""
    p.add_argument("--mesh", default=None, help="mesh spec to shard the weights over, e.g. tensor=4")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    p.add_argument("--decode-weights", choices=("float32", "bfloat16", "int8"), default="float32",
                   help="weight format for decoding (float32: exact; bfloat16, int8: smaller and faster)")
    p.add_argument("--adapter", default=None, help="a peft LoRA adapter (directory, URL or hub id) for this checkpoint")
    p.add_argument("--unmerged", action="store_true",
                   help="apply the adapter beside the weights instead of folding it into them")
    _kernel_flags(p)
    p.add_argument("--compilation-cache", default=None,
                   help="JAX persistent compilation cache directory (default: $BLOOM_JAX_COMPILATION_CACHE)")


def _speculation_flags(p: argparse.ArgumentParser) -> None:
    """Speculative decoding (`_load_generator` reads them): the same tokens, fewer passes over the weights."""
    p.add_argument("--draft", default=None,
                   help="speculative decoding: a smaller checkpoint with this one's tokenizer drafts tokens that "
                        "this one verifies (e.g. bloom-560m for bloom-7b1); loaded with the same flags")
    p.add_argument("--draft-tokens", type=_positive_int, default=4, help="tokens drafted per verification (K)")
    p.add_argument("--prompt-lookup", type=_positive_int, default=None,
                   help="speculative decoding without a draft: propose the tokens after the last earlier "
                        "occurrence of the context's final N tokens (code, quotes, edits)")


def _kernel_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernels", choices=("auto", "xla_cpu", "reference"), default="auto",
                   help="kernel set (bloom_jax.kernels): auto is the platform's")
    # The choices of bloom_jax.kernels, spelled out here so that building the parser does not import JAX.
    p.add_argument("--attention", choices=("auto", "reference", "blockwise", "cudnn", "flash"), default="auto",
                   help="attention: auto is blockwise (the reference where one block holds it all); cudnn "
                        "(NVIDIA GPUs) where cuDNN applies; flash (TPUs, NVIDIA GPUs): Pallas kernels with ALiBi "
                        "built inside")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; returns its exit status (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:  # a usage mistake, answered with the help (`--help` is the asked-for one)
            parser.print_help(sys.stderr)
            return 2
        with _sigterm_raises(args.command not in OWN_SIGTERM):
            args.func(args)
    except SystemExit as e:  # --help and --version
        return e.code if isinstance(e.code, int) else 0
    except BloomJaxError as e:
        if debug:
            traceback.print_exc()
        print(f"bloom-jax: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, RunFailed) else 2
    except KeyboardInterrupt:
        print("bloom-jax: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("bloom-jax: terminated", file=sys.stderr)
        return 143
    return 0


# Commands with their own SIGTERM: train saves a checkpoint and stops at the step's end, serve (uvicorn) drains.
OWN_SIGTERM = ("train", "serve")


@contextlib.contextmanager
def _sigterm_raises(enabled: bool):
    """SIGTERM raises `Terminated` in the main thread while the block runs, so that a command stops as on Ctrl-C:
    its partial output removed on the way out (Python's default would end the process with nothing cleaned)."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
