"""Checkpoint I/O: round trips with transformers, tolerated layouts, and clear errors for bad input.

- Round trip A: a checkpoint written by transformers' `save_pretrained` (single file or sharded) loads in dgemma
  with the same tensors and the same logits (<= 1e-5).
- Round trip B: dgemma's `save_model` (single file or sharded with an index) loads in transformers'
  `DiffusionGemmaForBlockDiffusion.from_pretrained` and back in dgemma with the same logits.
- Layouts: text weights only under `model.encoder.language_model.*`; vision-tower weights skipped with one warning.
- Bad input raises `dgemma.ConfigError` / `dgemma.CheckpointError` (both ValueError) naming the field or file.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dgemma
from dgemma import CheckpointError, ConfigError, DiffusionGemma, load_model, save_model
from dgemma.model.checkpoint import load_config, ours_to_hf
from dgemma.model.config import tiny_config
from dgemma.engine.reference import transformers_kernels
from dgemma.model.rope import rope_inv_freq

from oracle import build_hf
from test_modeling import _max_err, run_schedule, tie_encoder_copies

pytestmark = pytest.mark.filterwarnings("ignore:.*vision-tower tensors:UserWarning")

TOL = 1e-5
S, FULL = "sliding_attention", "full_attention"
# A short schedule (prompt, 2 canvases, one committed) on a left-padded batch: enough to exercise every tensor.
RUN = dict(B=2, T=7, C=4, pads=[0, 2], rounds=1, chunks=None)


def _quiet_load(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(path, **kw)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny transformers model (3 layers: sliding, sliding, k_eq_v full) and the directory it saved itself to."""
    hf = tie_encoder_copies(build_hf(seed=3, canvas_length=RUN["C"]))
    d = tmp_path_factory.mktemp("hf") / "ckpt"
    hf.save_pretrained(d)
    return hf, d


@pytest.fixture
def ckpt(hf_dir, tmp_path):
    """A private copy of the transformers checkpoint that a test may corrupt."""
    d = tmp_path / "ckpt"
    shutil.copytree(hf_dir[1], d)
    return d


def _compare(hf, model, tol=TOL, seed=0):
    # Reference kernels (transformers' own choices): what is compared is the loaded weights; how far the fast path's
    # kernels may round from transformers is test_modeling's question (anchored to a float64 run).
    with transformers_kernels(model):
        errs = {what: _max_err(o, r, v) for what, o, r, v in run_schedule(hf, model, seed=seed, **RUN)}
    bad = {k: v for k, v in errs.items() if v > tol}
    assert not bad, bad
    print(f"max abs logits error {max(errs.values()):.3g}")
    return max(errs.values())


def _dg_outputs(model, seed=0):
    """All logits dgemma produces on the RUN schedule (a fixed transformers model drives the shapes only)."""
    g = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    B, T, C = RUN["B"], RUN["T"], RUN["C"]
    ids = torch.randint(3, V, (B, T), generator=g)
    canvas = torch.randint(0, V, (B, C), generator=g)
    sc = torch.randn(B, C, V, generator=g)
    with torch.no_grad():
        kv = model.new_cache(B, T + 2 * C)
        out = [model.logits(model.encode(ids, kv)), model.denoise(canvas, kv), model.denoise(canvas, kv, sc)]
        out.append(model.logits(model.encode(canvas, kv)))
        out.append(model.denoise(canvas, kv, sc))
    return out


def _assert_same_state(a: DiffusionGemma, b: DiffusionGemma):
    """Same weights and layer scalars, same dtypes (the RoPE tables are derived, not state)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def _hf_from_pretrained(path):
    from transformers import DiffusionGemmaForBlockDiffusion

    hf, info = DiffusionGemmaForBlockDiffusion.from_pretrained(
        path, attn_implementation="sdpa", output_loading_info=True
    )
    hf.config.text_config._attn_implementation = "sdpa"
    # dgemma writes no vision tower, so transformers initialises that (and only that) itself
    text_missing = [k for k in info["missing_keys"] if "vision" not in k]
    assert not text_missing, text_missing
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info.get("mismatched_keys"), info.get("mismatched_keys")
    return hf.eval()


def _randomise(model: DiffusionGemma, seed: int) -> DiffusionGemma:
    """Random weights everywhere, norms and scales around 1, distinct encoder/decoder layer scalars."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(
                1.0 + 0.3 * torch.randn(p.shape, generator=g)
                if p.ndim == 1
                else 0.2 * torch.randn(p.shape, generator=g)
            )
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return model.eval()


def _edit_config(path: Path, fn):
    f = path / "config.json"
    cfg = json.loads(f.read_text())
    fn(cfg)
    f.write_text(json.dumps(cfg))


def _edit_weights(path: Path, fn, name="model.safetensors"):
    f = path / name
    tensors = fn(load_file(str(f)))
    f.unlink()
    save_file(tensors, str(f), metadata={"format": "pt"})


def test_errors_are_value_errors():
    assert issubclass(ConfigError, ValueError) and issubclass(CheckpointError, ValueError)
    assert dgemma.ConfigError is ConfigError and dgemma.CheckpointError is CheckpointError


# -- round trip A: transformers -> dgemma ------------------------------------------------------------------------


def test_transformers_checkpoint_loads_identically(hf_dir):
    hf, d = hf_dir
    model = _quiet_load(d)
    hf_state = hf.state_dict()
    ours = {**dict(model.named_parameters()), **{n: b for n, b in model.named_buffers() if "layer_scalar" in n}}
    for name, t in ours.items():
        assert torch.equal(t, hf_state[ours_to_hf(name)]), name
    # tied encoder copies are the same tensors as the decoder ones in transformers
    assert torch.equal(
        model.layers[0].encoder_layer_scalar, hf_state["model.encoder.language_model.layers.0.layer_scalar"]
    )
    assert not torch.equal(model.layers[0].encoder_layer_scalar, model.layers[0].layer_scalar)
    assert model.config.canvas_length == RUN["C"]
    _compare(hf, model)


def test_transformers_sharded_checkpoint_loads(hf_dir, tmp_path):
    hf, d = hf_dir
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    _assert_same_state(_quiet_load(tmp_path), _quiet_load(d))


def test_vision_weights_skipped_with_one_warning(hf_dir):
    with pytest.warns(UserWarning) as rec:
        load_model(hf_dir[1])
    vision = [w for w in rec if "vision" in str(w.message)]
    assert len(vision) == 1, [str(w.message) for w in rec]
    assert len(rec) == 1, [str(w.message) for w in rec]


def test_text_only_checkpoint_loads_without_warning(hf_dir, tmp_path):
    model = _quiet_load(hf_dir[1])
    save_model(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(tmp_path)


def test_encoder_only_keys_load_the_same(tmp_path):
    """All text weights under `model.encoder.language_model.*` (no `model.decoder.*` at all)."""
    hf = tie_encoder_copies(build_hf(seed=4, canvas_length=RUN["C"]))
    with torch.no_grad():  # one scalar per layer in such a checkpoint, so make the decoder's the same
        for enc, dec in zip(hf.model.encoder.language_model.layers, hf.model.decoder.layers):
            dec.layer_scalar.copy_(enc.layer_scalar)
    orig = tmp_path / "orig"
    hf.save_pretrained(orig)
    renamed = tmp_path / "renamed"
    shutil.copytree(orig, renamed)

    def rename(t):
        out = {}
        for k, v in t.items():
            if k.startswith("model.decoder."):
                new = "model.encoder.language_model." + k[len("model.decoder.") :]
                if new in t:  # the layer scalars: the encoder copy is already there (and equal)
                    assert torch.equal(t[new], v)
                    continue
                out[new] = v
            else:
                out[k] = v
        assert not any(k.startswith("model.decoder.") for k in out)
        return out

    _edit_weights(renamed, rename)
    a, b = _quiet_load(orig), _quiet_load(renamed)
    _assert_same_state(a, b)
    for x, y in zip(_dg_outputs(a), _dg_outputs(b)):
        assert torch.equal(x, y)
    _compare(hf, b)


def _untied_hf(seed: int, **config_kw):
    """Like oracle.build_hf, but with DiffusionGemmaConfig overrides (every parameter randomised on its own)."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    from oracle import TINY_VISION, hf_text_config

    text = config_kw.pop("text", {})
    cfg = DiffusionGemmaConfig(
        text_config=hf_text_config(**text), vision_config=TINY_VISION, canvas_length=RUN["C"], **config_kw
    )
    cfg.text_config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    hf = DiffusionGemmaForBlockDiffusion(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "vision" not in name:
                p.copy_(
                    1.0 + 0.3 * torch.randn(p.shape, generator=g)
                    if p.ndim == 1
                    else 0.2 * torch.randn(p.shape, generator=g)
                )
    return hf


@pytest.mark.parametrize("untied", ["attention biases", "tie_word_embeddings=False"])
def test_untied_copies_are_not_silently_dropped(tmp_path, untied):
    """A checkpoint whose encoder / decoder / lm_head copies differ must not load as if they were tied.

    transformers ties the encoder to the decoder by name patterns that do not cover the attention biases, and
    `tie_word_embeddings=False` unties everything (encoder, decoder, lm_head). Such a checkpoint holds several
    different copies of a "shared" tensor. dgemma must either refuse it (CheckpointError / ConfigError) or
    reproduce transformers' logits; it must not silently keep one copy and drop the others.
    """
    if untied == "attention biases":
        hf = _untied_hf(5, text=dict(attention_bias=True))
        assert not torch.equal(
            hf.model.encoder.language_model.layers[0].self_attn.q_proj.bias,
            hf.model.decoder.layers[0].self_attn.q_proj.bias,
        )
    else:
        hf = _untied_hf(6, tie_word_embeddings=False)
        assert not torch.equal(hf.lm_head.weight, hf.model.decoder.embed_tokens.weight)
    hf.save_pretrained(tmp_path)
    try:
        model = _quiet_load(tmp_path)
    except (CheckpointError, ConfigError):
        return
    _compare(hf, model, tol=1e-4)


def test_last_layer_must_be_full_attention(tmp_path):
    """transformers forces the last layer to full attention; a dgemma checkpoint must mean the same thing there.

    dgemma must either refuse such a config (ConfigError naming layer_types) or save a checkpoint that
    transformers loads with the same logits.
    """
    torch.manual_seed(0)
    try:
        model = _randomise(DiffusionGemma(tiny_config(layer_types=[FULL, S], canvas_length=RUN["C"])), seed=2)
    except ConfigError as e:
        assert "layer_types" in str(e)
        return
    save_model(model, tmp_path)
    _compare(_hf_from_pretrained(tmp_path), model)


# -- round trip B: dgemma -> transformers ------------------------------------------------------------------------


def test_dgemma_checkpoint_loads_in_transformers(hf_dir, tmp_path):
    hf, d = hf_dir
    model = _quiet_load(d)
    save_model(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["DiffusionGemmaForBlockDiffusion"]
    hf2 = _hf_from_pretrained(tmp_path)
    sd1, sd2 = hf.state_dict(), hf2.state_dict()
    for k, v in sd1.items():
        if "vision" not in k and "inv_freq" not in k:
            assert torch.equal(v, sd2[k]), k
    _compare(hf2, model)
    _assert_same_state(_quiet_load(tmp_path), model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fresh_dgemma_model_round_trips(tmp_path, dtype):
    """A model dgemma built itself (no transformers config extras) saves, reloads and loads in transformers."""
    torch.manual_seed(0)
    model = _randomise(DiffusionGemma(tiny_config(canvas_length=RUN["C"])), seed=1).to(dtype)
    # `.to()` rounds the RoPE tables too, which `load_model` computes in float32: recompute them the same way
    model.inv_freq_sliding = rope_inv_freq(model.text, True)
    model.inv_freq_full = rope_inv_freq(model.text, False)
    save_model(model, tmp_path, generation_config={"max_denoising_steps": 16})
    again = _quiet_load(tmp_path, dtype=dtype)
    _assert_same_state(again, model)
    for x, y in zip(_dg_outputs(model), _dg_outputs(again)):
        assert torch.equal(x, y)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert gen["max_denoising_steps"] == 16 and gen["eos_token_id"] == 1
    if dtype == torch.float32:
        _compare(_hf_from_pretrained(tmp_path), model)


def test_sharded_dgemma_checkpoint(hf_dir, tmp_path):
    hf, d = hf_dir
    model = _quiet_load(d)
    save_model(model, tmp_path, max_shard_bytes=2000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tmp_path / s).exists() for s in shards)
    assert not (tmp_path / "model.safetensors").exists()
    _assert_same_state(_quiet_load(tmp_path), model)
    _compare(_hf_from_pretrained(tmp_path), model)
    # saving again unsharded into the same directory leaves no stale index behind
    save_model(model, tmp_path)
    assert not (tmp_path / "model.safetensors.index.json").exists()
    _assert_same_state(_quiet_load(tmp_path), model)


@pytest.mark.parametrize(
    "geometry",
    [
        dict(head_dim=8, global_head_dim=16, num_key_value_heads=2, num_global_key_value_heads=1),
        dict(head_dim=8, global_head_dim=16, num_key_value_heads=2, num_global_key_value_heads=2),
        dict(head_dim=8, global_head_dim=8, num_key_value_heads=2, num_global_key_value_heads=None),
        dict(head_dim=8, global_head_dim=8, num_key_value_heads=2, num_global_key_value_heads=1),
    ],
)
def test_config_geometry_matches_transformers(tmp_path, geometry):
    """transformers drops per-layer overrides equal to the base value; dgemma must read the same geometry."""
    from transformers import DiffusionGemmaConfig

    from oracle import TINY_VISION, hf_text_config

    cfg = DiffusionGemmaConfig(text_config=hf_text_config(**geometry), vision_config=TINY_VISION)
    cfg.save_pretrained(tmp_path)
    text = load_config(tmp_path).text
    for i in range(cfg.text_config.num_hidden_layers):
        ref = cfg.text_config.per_layer_config[i]
        assert (text.layer_head_dim(i), text.layer_kv_heads(i)) == (ref.head_dim, ref.num_key_value_heads), (
            i,
            json.loads((tmp_path / "config.json").read_text())["text_config"]["per_layer_config"],
        )


# -- bad input ---------------------------------------------------------------------------------------------------


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does_not_exist"):
        load_model(tmp_path / "does_not_exist")


def test_path_is_a_file(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(f)


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(ckpt)


@pytest.mark.parametrize("text", ["{not json", "", "\x00\x01garbage"])
def test_config_not_json(ckpt, text):
    (ckpt / "config.json").write_text(text)
    with pytest.raises(ConfigError, match="config.json"):
        load_model(ckpt)


def test_config_not_an_object(ckpt):
    (ckpt / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(ConfigError, match="config.json"):
        load_model(ckpt)


def test_missing_text_config(ckpt):
    _edit_config(ckpt, lambda c: c.pop("text_config"))
    with pytest.raises(ConfigError, match="text_config"):
        load_model(ckpt)


def test_unknown_architecture(ckpt):
    _edit_config(ckpt, lambda c: c.update(architectures=["LlamaForCausalLM"]))
    with pytest.raises(ConfigError, match="LlamaForCausalLM"):
        load_model(ckpt)


def test_unknown_model_type(ckpt):
    _edit_config(ckpt, lambda c: c.update(model_type="llama"))
    with pytest.raises(ConfigError, match="model_type"):
        load_model(ckpt)


def _text(**kv):
    return lambda c: c["text_config"].update(kv)


def _drop(key):
    return lambda c: c["text_config"].pop(key)


BAD_FIELDS = {
    "missing num_experts": (_drop("num_experts"), "num_experts"),
    "missing top_k_experts": (_drop("top_k_experts"), "top_k_experts"),
    "missing moe_intermediate_size": (_drop("moe_intermediate_size"), "moe_intermediate_size"),
    "kv heads do not divide heads": (_text(num_key_value_heads=3), "num_attention_heads"),
    "full-layer kv heads do not divide heads": (
        _text(per_layer_config={"2": {"head_dim": 16, "num_key_value_heads": 3}}),
        "num_attention_heads",
    ),
    "top_k > num_experts": (_text(top_k_experts=5), "top_k_experts"),
    "layer_types too short": (_text(layer_types=[S, FULL]), "layer_types"),
    "layer_types too long": (_text(layer_types=[S, S, FULL, FULL]), "layer_types"),
    "unknown layer type": (_text(layer_types=[S, "chunked_attention", FULL]), "chunked_attention"),
    "layer_types not a list": (_text(layer_types="sliding_attention"), "layer_types"),
    "hidden_size a string": (_text(hidden_size="32"), "hidden_size"),
    "hidden_size negative": (_text(hidden_size=-32), "hidden_size"),
    "hidden_size a float": (_text(hidden_size=32.0), "hidden_size"),
    "num_hidden_layers zero": (_text(num_hidden_layers=0, layer_types=[], per_layer_config={}), "num_hidden_layers"),
    "head_dim a bool": (_text(head_dim=True), "head_dim"),
    "unknown activation": (_text(hidden_activation="relu6"), "hidden_activation"),
    "unknown rope type": (
        _text(
            rope_parameters={
                S: {"rope_type": "yarn", "rope_theta": 1e4},
                FULL: {"rope_type": "default", "rope_theta": 1e6},
            }
        ),
        "rope_type",
    ),
    "rope params missing a layer type": (
        _text(rope_parameters={S: {"rope_type": "default", "rope_theta": 1e4}}),
        "rope_parameters",
    ),
    "pad token outside vocab": (_text(pad_token_id=96), "pad_token_id"),
    "eos token outside vocab": (_text(eos_token_id=[1, 500]), "eos_token_id"),
    "negative rms_norm_eps": (_text(rms_norm_eps=-1e-6), "rms_norm_eps"),
    "zero softcapping": (_text(final_logit_softcapping=0), "final_logit_softcapping"),
    "bidirectional encoder": (_text(use_bidirectional_attention="all"), "use_bidirectional_attention"),
    "per-layer override of a sliding layer": (_text(per_layer_config={"0": {"head_dim": 16}}), "per_layer_config"),
    "per-layer override with unknown key": (_text(per_layer_config={"2": {"sliding_window": 3}}), "per_layer_config"),
    "per-layer index out of range": (_text(per_layer_config={"9": {"head_dim": 16}}), "per_layer_config"),
    "text_config not an object": (lambda c: c.update(text_config="gemma"), "text_config"),
    "canvas_length zero": (lambda c: c.update(canvas_length=0), "canvas_length"),
}


@pytest.mark.parametrize("case", list(BAD_FIELDS))
def test_bad_config_field(ckpt, case):
    edit, field = BAD_FIELDS[case]
    _edit_config(ckpt, edit)
    with pytest.raises(ConfigError) as e:
        load_model(ckpt)
    assert field in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "edit,tensor",
    [
        (_text(hidden_size=48), "model.decoder."),
        (_text(vocab_size=100), "embed_tokens"),
        (_text(moe_intermediate_size=8), "experts"),
        (_text(num_experts=5), "layers.0."),
        (_text(per_layer_config={"2": {"head_dim": 32, "num_key_value_heads": 1}}), "layers.2.self_attn"),
    ],
)
def test_shape_mismatch_between_config_and_weights(ckpt, edit, tensor):
    _edit_config(ckpt, edit)
    with pytest.raises(CheckpointError) as e:
        load_model(ckpt)
    msg = str(e.value)
    assert tensor in msg and "shape" in msg and "config.json" in msg, msg


def test_more_layers_in_config_than_weights(ckpt):
    # (every full layer gets the override: dgemma needs one head_dim for all full-attention layers)
    _edit_config(
        ckpt,
        _text(
            num_hidden_layers=4,
            layer_types=[S, S, FULL, FULL],
            per_layer_config={"2": {"head_dim": 16}, "3": {"head_dim": 16}},
        ),
    )
    with pytest.raises(CheckpointError, match="missing tensors.*layers.3"):
        load_model(ckpt)


def test_fewer_layers_in_config_than_weights(ckpt):
    _edit_config(ckpt, _text(num_hidden_layers=2, layer_types=[S, FULL], per_layer_config={"1": {"head_dim": 16}}))
    with pytest.raises(CheckpointError, match="layers.2"):
        load_model(ckpt)


def test_truncated_safetensors(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(ckpt)


@pytest.mark.parametrize("kind", ["random", "empty", "bad json header", "huge header length"])
def test_corrupt_safetensors_header(ckpt, kind):
    f = ckpt / "model.safetensors"
    size = f.stat().st_size
    if kind == "random":
        f.write_bytes(os.urandom(size))
    elif kind == "empty":
        f.write_bytes(b"")
    elif kind == "bad json header":
        f.write_bytes((16).to_bytes(8, "little") + b"{not json at all" + b"\0" * 64)
    else:
        f.write_bytes((2**60).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(ckpt)


def test_missing_shard(hf_dir, tmp_path):
    save_model(_quiet_load(hf_dir[1]), tmp_path, max_shard_bytes=2000)
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=shards[1].name):
        load_model(tmp_path)


def test_corrupt_index(hf_dir, tmp_path):
    save_model(_quiet_load(hf_dir[1]), tmp_path, max_shard_bytes=2000)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        load_model(tmp_path)


def test_truncated_shard(hf_dir, tmp_path):
    save_model(_quiet_load(hf_dir[1]), tmp_path, max_shard_bytes=2000)
    shard = sorted(tmp_path.glob("model-*-of-*.safetensors"))[2]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=shard.name):
        load_model(tmp_path)


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any attempt to unpickle fails the test (and is recorded, in case the loader swallows the exception)."""
    calls = []

    def refuse(*a, **k):
        calls.append(a)
        raise AssertionError("dgemma must never unpickle a checkpoint")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(torch.serialization, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    yield calls
    assert not calls, "torch.load / pickle was called"


def test_pickle_only_checkpoint_is_refused(ckpt, no_unpickling):
    # write the .bin with the real torch.save (saving does not unpickle)
    torch.save({"model.decoder.norm.weight": torch.ones(32)}, ckpt / "pytorch_model.bin")
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        load_model(ckpt)
    msg = str(e.value)
    assert "safetensors" in msg and (".bin" in msg or "pickle" in msg), msg


def test_safetensors_preferred_over_pickle(hf_dir, ckpt, no_unpickling):
    torch.save({"model.decoder.norm.weight": torch.zeros(32)}, ckpt / "pytorch_model.bin")
    _assert_same_state(_quiet_load(ckpt), _quiet_load(hf_dir[1]))


def test_no_weights_at_all(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(ckpt)


@pytest.mark.parametrize(
    "key",
    [
        "model.decoder.layers.1.self_attn.q_proj.weight",
        "model.decoder.norm.weight",
        "model.decoder.layers.0.experts.gate_up_proj",
        "model.decoder.self_conditioning.pre_norm.weight",
        "model.decoder.embed_tokens.weight",
    ],
)
def test_missing_tensor(ckpt, key):
    _edit_weights(ckpt, lambda t: {k: v for k, v in t.items() if k != key})
    with pytest.raises(CheckpointError) as e:
        load_model(ckpt)
    msg = str(e.value)
    assert "missing" in msg and key[len("model.decoder.") :] in msg, msg


def test_missing_layer_scalars_default_to_one(ckpt):
    """Layer scalars are buffers some exporters omit: both copies missing means 1.0, like a fresh model."""
    _edit_weights(ckpt, lambda t: {k: v for k, v in t.items() if not k.endswith("layers.1.layer_scalar")})
    model = _quiet_load(ckpt)
    assert model.layers[1].layer_scalar.item() == 1.0 and model.layers[1].encoder_layer_scalar.item() == 1.0


@pytest.mark.parametrize(
    "key", ["model.decoder.layers.9.mlp.gate_proj.weight", "model.decoder.layers.2.self_attn.v_proj.weight"]
)
def test_unexpected_tensor(ckpt, key):
    _edit_weights(ckpt, lambda t: {**t, key: torch.zeros(48, 32)})
    with pytest.raises(CheckpointError, match=key[len("model.decoder.") :].replace(".", r"\.")):
        load_model(ckpt)


def test_foreign_tensor_name(ckpt):
    _edit_weights(ckpt, lambda t: {**t, "transformer.h.0.attn.c_attn.weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match="transformer.h.0.attn.c_attn.weight"):
        load_model(ckpt)


def test_integer_tensor(ckpt):
    key = "model.decoder.norm.weight"
    _edit_weights(ckpt, lambda t: {**t, key: torch.ones(32, dtype=torch.int32)})
    with pytest.raises(CheckpointError, match="norm.weight"):
        load_model(ckpt)


def test_bad_generation_config(ckpt):
    (ckpt / "generation_config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="generation_config.json"):
        dgemma.model.checkpoint.load_generation_config(ckpt)
