"""LoRA against peft on transformers' BLOOM: logits and adapter gradients, peft's files both ways, folding, and
the adapter configs peft can write that ours refuse."""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import PARITY_RTOL, hf_model, random_ids, save_hf, tiny_config

from bloom_jax import BloomJaxError
from bloom_jax.checkpoints import load_hf_params
from bloom_jax.checkpoints.peft import load_adapter, save_adapter
from bloom_jax.lora import TARGETS, LoraConfig, count_adapter_params, fold, merge_trees, split_adapters
from bloom_jax.model import init_params, make_model, unstack_layers

CONFIG = tiny_config(n_layer=2)


def relative_to_largest(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def peft_model(base, rank=4, alpha=8.0, targets=TARGETS, seed=1, **kwargs):
    """peft's LoRA on a copy of `base`, every adapter weight random (lora_B too, so each adapter counts)."""
    import peft
    import torch

    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, **kwargs))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) / np.sqrt(p.shape[1]))
    return model.eval()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """transformers' random BLOOM, saved as a Hugging Face directory."""
    torch_model = hf_model(CONFIG, seed=0)
    return torch_model, save_hf(torch_model, tmp_path_factory.mktemp("base"))


@pytest.mark.slow
@pytest.mark.parametrize("scan_layers", [True, False])
def test_peft_adapters_give_peft_logits_and_gradients(base, tmp_path, scan_layers):
    import torch

    torch_base, base_dir = base
    theirs = peft_model(torch_base)
    theirs.save_pretrained(tmp_path)
    lora, adapters, _ = load_adapter(tmp_path, CONFIG, scan_layers)
    assert (lora.rank, lora.alpha, lora.targets) == (4, 8.0, TARGETS)
    model = make_model(CONFIG, scan_layers=scan_layers, lora=lora)
    base_params = load_hf_params(base_dir, make_model(CONFIG))
    if not scan_layers:
        base_params = unstack_layers(base_params)

    ids = random_ids(CONFIG, 2, 9)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    cotangent = np.random.default_rng(2).normal(size=(2, 9, CONFIG.vocab_size)).astype(np.float32) * mask[..., None]

    def loss(adapters):
        logits = model.apply({"params": merge_trees(base_params, adapters)}, ids, attention_mask=mask)
        return jnp.sum(logits * cotangent), logits

    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(adapters)
    ids_t, mask_t = torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(mask, dtype=torch.long)
    ref_logits = theirs(input_ids=ids_t, attention_mask=mask_t).logits
    (ref_logits * torch.as_tensor(cotangent)).sum().backward()
    keep = mask[..., None] > 0
    assert relative_to_largest(np.where(keep, logits, 0), np.where(keep, ref_logits.detach().numpy(), 0)) <= PARITY_RTOL

    # the gradient of every adapter weight, through our tree's names and layout, against peft's
    ref_grads = {name: p.grad.numpy() for name, p in theirs.named_parameters() if p.grad is not None}
    assert len(ref_grads) == 2 * len(TARGETS) * CONFIG.n_layer and all("lora_" in n for n in ref_grads)
    grad_dir = tmp_path / "grads"
    save_adapter(jax.tree.map(np.asarray, grads), lora, CONFIG, grad_dir)
    _, grads_as_peft, _ = load_adapter(grad_dir, CONFIG, scan_layers)
    from bloom_jax.checkpoints.hf_files import SafetensorsFile

    stored = SafetensorsFile(grad_dir / "adapter_model.safetensors")
    worst = 0.0
    for name in stored.keys():
        ref = ref_grads[name.replace(".weight", ".default.weight")]
        worst = max(worst, relative_to_largest(stored.get_tensor(name), ref))
    assert worst <= 1e-4
    assert jax.tree.structure(grads_as_peft) == jax.tree.structure(adapters)


@pytest.mark.slow
def test_our_adapters_load_in_peft_with_our_logits(base, tmp_path):
    import peft
    import torch

    torch_base, base_dir = base
    torch_base = copy.deepcopy(torch_base)  # peft wraps the model it loads into
    lora = LoraConfig(rank=3, alpha=5.0, targets=("query_key_value", "dense_4h_to_h"))
    model = make_model(CONFIG, lora=lora)
    base_params = load_hf_params(base_dir, make_model(CONFIG))
    _, adapters = split_adapters(init_params(model, jax.random.key(3)))
    # lora_b starts at zero; make it count
    adapters = jax.tree_util.tree_map_with_path(
        lambda path, x: jax.random.normal(jax.random.key(len(str(path))), x.shape) * 0.3
        if path[-1].key == "lora_b" else x, adapters)
    assert count_adapter_params(adapters) == CONFIG.n_layer * 3 * (64 + 3 * 64 + 256 + 64)
    save_adapter(jax.tree.map(np.asarray, adapters), lora, CONFIG, tmp_path / "adapter",
                 base_model_name_or_path=str(base_dir))
    config_json = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config_json["base_model_name_or_path"] == str(base_dir) and config_json["r"] == 3

    theirs = peft.PeftModel.from_pretrained(torch_base, tmp_path / "adapter").eval()
    ids = random_ids(CONFIG, 2, 7, seed=4)
    with torch.no_grad():
        ref = theirs(input_ids=torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    ours = model.apply({"params": merge_trees(base_params, adapters)}, ids)
    assert relative_to_largest(ours, ref) <= PARITY_RTOL
    plain = make_model(CONFIG).apply({"params": base_params}, ids)
    assert relative_to_largest(plain, ref) > 1e-2  # the adapters matter

    # and back: the same tree
    loaded_lora, loaded, _ = load_adapter(tmp_path / "adapter", CONFIG)
    assert loaded_lora == lora
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), adapters, loaded)


@pytest.mark.slow
def test_lora_training_fits_a_batch_with_the_base_frozen(base):
    from bloom_jax.recipe import TrainConfig
    from bloom_jax.train import make_optimizer, train_step

    base_params = load_hf_params(base[1], make_model(CONFIG))
    model = make_model(CONFIG, lora=LoraConfig(rank=4, alpha=8.0))
    _, adapters = split_adapters(init_params(model, jax.random.key(0)))
    optimizer = make_optimizer(TrainConfig(learning_rate=3e-2, warmup_steps=0, steps=30, weight_decay=0.0))
    state = {"step": jnp.int32(0), "params": adapters, "opt_state": optimizer.init(adapters)}
    step = jax.jit(lambda state, tokens, frozen: train_step(model, optimizer, 1, 0, False, state, tokens,
                                                            frozen=frozen))
    tokens = random_ids(CONFIG, 8, 33)
    losses = []
    for _ in range(30):
        state, metrics = step(state, tokens, base_params)
        losses.append(float(metrics["loss"]))
    # Measured: 14.81 at the base (adapters at zero), 5.41 after 30 steps.
    assert losses[0] == pytest.approx(14.81, abs=0.01) and losses[-1] < 6.0, losses


@pytest.mark.slow
def test_qlora_trains_as_lora_does_within_a_stated_bound(base):
    """The same adapters, batches and optimizer on the float base and on its int8 and nf4 forms: every step's
    loss within 1% (int8) and 3% (nf4) of the float run's. Measured over 30 steps: 0.30% and 1.7% at worst."""
    from bloom_jax.quantize import quantize_base
    from bloom_jax.recipe import TrainConfig
    from bloom_jax.train import make_optimizer, train_step

    base_params = load_hf_params(base[1], make_model(CONFIG))
    lora = LoraConfig(rank=4, alpha=8.0)
    _, adapters = split_adapters(init_params(make_model(CONFIG, lora=lora), jax.random.key(0)))
    optimizer = make_optimizer(TrainConfig(learning_rate=3e-2, warmup_steps=0, steps=30, weight_decay=0.0))
    losses = {}
    for fmt in (None, "int8", "nf4"):
        model = make_model(CONFIG, lora=lora, frozen_weights=fmt)
        frozen = base_params if fmt is None else quantize_base(base_params, fmt)
        state = {"step": jnp.int32(0), "params": adapters, "opt_state": optimizer.init(adapters)}
        step = jax.jit(lambda state, tokens, frozen, model=model: train_step(model, optimizer, 1, 0, False, state,
                                                                             tokens, frozen=frozen))
        losses[fmt] = []
        for i in range(30):
            state, metrics = step(state, random_ids(CONFIG, 8, 33, seed=i % 3), frozen)
            losses[fmt].append(float(metrics["loss"]))
    reference = np.array(losses[None])
    assert reference[-1] < reference[0] - 5  # it learns: 14.8 -> 7.2
    for fmt, bound in (("int8", 0.01), ("nf4", 0.03)):
        assert np.max(np.abs(np.array(losses[fmt]) - reference) / reference) <= bound, fmt


@pytest.mark.parametrize("scan_layers", [True, False])
def test_a_frozen_int8_base_holds_the_int8_decode_weights(scan_layers):
    """One int8 scheme: the QLoRA base's linear layers are the int8 decode weights' arrays, bit for bit."""
    from flax.traverse_util import flatten_dict

    from bloom_jax.quantize import quantize_base
    from bloom_jax.weights import to_decode_weights

    params = init_params(make_model(CONFIG, scan_layers=scan_layers), jax.random.key(3))
    frozen, decode = flatten_dict(quantize_base(params, "int8")), flatten_dict(to_decode_weights(params, "int8"))
    linear = [path for path in frozen if path[-2] in ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
              and path[-1] != "bias"]
    assert len(linear) == 2 * 4 * (1 if scan_layers else CONFIG.n_layer)
    for path in linear:
        assert frozen[path].dtype == decode[path].dtype and np.array_equal(frozen[path], decode[path]), path


def test_frozen_formats_round_to_their_grids():
    """int8: each weight within half a step of its channel's scale; nf4: each weight at the NF4 level nearest its
    block-normalised value (checked against a brute-force search), times the block's absmax."""
    from bloom_jax.quantize import NF4_LEVELS, dequantize, nf4_block, quantize

    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.02, (2, 80, 8, 3, 4)).astype(np.float32)  # layers, in (80: bloom-3b's head size), out
    stored = quantize(jnp.asarray(w), 1, 1, "int8")
    assert stored["kernel"].shape == (2, 8, 3, 4, 80) and stored["scale"].shape == (2, 8, 3, 4)  # out-major
    back = np.moveaxis(np.asarray(dequantize(stored, 1, 1, "int8", jnp.float32)), -1, 1)
    scale = np.max(np.abs(w), axis=1, keepdims=True) / 127
    assert np.all(np.abs(back - w) <= scale / 2 * (1 + 1e-6))
    stored = quantize(jnp.asarray(w), 1, 1, "nf4")
    assert stored["kernel"].shape == (2, 40, 8, 3, 4) and stored["kernel_absmax"].shape == (2, 80 // 16, 8, 3, 4)
    assert nf4_block(80) == 16 and nf4_block(4096) == 64
    back = np.asarray(dequantize(stored, 1, 1, "nf4", jnp.float32))
    blocks = w.reshape(2, 5, 16, 8, 3, 4)
    absmax = np.max(np.abs(blocks), axis=2, keepdims=True)
    nearest = NF4_LEVELS[np.argmin(np.abs((blocks / absmax)[..., None] - NF4_LEVELS), axis=-1)]
    np.testing.assert_allclose(back, (nearest * absmax).reshape(w.shape), rtol=1e-6, atol=1e-9)


def test_the_recipe_spells_the_lora_names_as_the_model_does():
    from bloom_jax import recipe
    from bloom_jax.quantize import FROZEN_FORMATS

    assert recipe.LORA_TARGETS == TARGETS
    assert set(recipe.LORA_BASES) == {"float32", "bfloat16", *FROZEN_FORMATS}


@pytest.mark.slow
def test_folded_adapters_give_the_adapted_logits():
    lora = LoraConfig(rank=2, alpha=4.0)
    model = make_model(CONFIG, lora=lora)
    params = init_params(model, jax.random.key(0))
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.2 if path[-1].key == "lora_b" else x, params)
    ids = random_ids(CONFIG, 1, 6)
    adapted = model.apply({"params": params}, ids)
    folded = fold(jax.tree.map(np.asarray, params), lora)
    plain = make_model(CONFIG).apply({"params": folded}, ids)
    assert relative_to_largest(plain, adapted) <= 1e-5
    assert jax.tree.structure(folded) == jax.tree.structure(init_params(make_model(CONFIG), jax.random.key(0)))


@pytest.mark.slow
def test_adapter_dropout_only_in_training():
    lora = LoraConfig(rank=2, alpha=4.0, dropout=0.5)
    model = make_model(CONFIG, lora=lora)
    params = init_params(model, jax.random.key(0))
    params = jax.tree_util.tree_map_with_path(lambda path, x: x + 0.2 if path[-1].key == "lora_b" else x, params)
    ids = random_ids(CONFIG, 1, 6)
    evaluated = model.apply({"params": params}, ids)
    no_dropout = make_model(CONFIG, lora=LoraConfig(rank=2, alpha=4.0)).apply({"params": params}, ids)
    np.testing.assert_array_equal(evaluated, no_dropout)
    trained = model.apply({"params": params}, ids, deterministic=False, rngs={"dropout": jax.random.key(1)})
    assert np.max(np.abs(trained - evaluated)) > 1e-3


@pytest.mark.parametrize("change, message", [
    ({"use_dora": True}, "use_dora=True is not supported"),
    ({"rank_pattern": {"h.0.mlp.dense_h_to_4h": 8}}, "rank_pattern"),
    ({"bias": "all"}, "bias='all' is not supported"),
    ({"peft_type": "IA3"}, "peft_type 'IA3' is not LORA"),
])
def test_adapter_configs_ours_cannot_express_are_refused(base, tmp_path, change, message):
    peft_model(base[0], rank=2).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(BloomJaxError, match=message):
        load_adapter(tmp_path, CONFIG)


def test_adapters_on_some_layers_only_and_pickles_are_refused(base, tmp_path):
    peft_model(base[0], rank=2, layers_to_transform=[0]).save_pretrained(tmp_path / "one-layer")
    with pytest.raises(BloomJaxError, match="layers_to_transform"):
        load_adapter(tmp_path / "one-layer", CONFIG)
    peft_model(base[0], rank=2).save_pretrained(tmp_path / "pickle", safe_serialization=False)
    with pytest.raises(BloomJaxError, match="adapter_model.bin, a pickle"):
        load_adapter(tmp_path / "pickle", CONFIG)
    with pytest.raises(BloomJaxError, match="is not a LoRA adapter: no adapter_config.json"):
        load_adapter(base[1], CONFIG)
    with pytest.raises(BloomJaxError, match="lora targets must be some of"):
        LoraConfig(targets=("lm_head",))
