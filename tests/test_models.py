"""IBNorm inside real (tiny, randomly initialised) ``transformers`` models.

Four models built from configs, nothing downloaded: GPT-2 and ViT (``nn.LayerNorm``),
LLaMA (``LlamaRMSNorm``) and ResNet (``nn.BatchNorm2d``). What is checked: λ = 0 gives the
parent model back exactly, λ > 0 changes it, conversion keeps Parameters, buffers,
state_dict keys, training flag and dtype, ``include``/``exclude`` select the right layers,
the transformers integration, ``torch.compile(fullgraph=True)`` against eager, and ONNX
export run by onnxruntime.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ibnorm import DEFAULT_VARIANTS, IBBatchNorm2d, IBLayerNorm, IBRMSNorm, convert_norms

transformers = pytest.importorskip("transformers")
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402

from ibnorm.integrations.transformers import convert_hf_model, ib_model_from_config  # noqa: E402

COMPRESSIONS = ("S", "L", "T")
IB_CLASSES = (IBLayerNorm, IBRMSNorm, IBBatchNorm2d)


# --------------------------------------------------------------------------- models


def gpt2_config(**overrides):
    kwargs = dict(
        n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    kwargs.update(overrides)
    return transformers.GPT2Config(**kwargs)


def llama_config():
    return transformers.LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=64,
        max_position_embeddings=32,
    )


def vit_config():
    return transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=5,
    )


def resnet_config():
    return transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5)


def token_input(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))


def image_input(size: int, batch: int = 2, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@dataclass(frozen=True)
class Spec:
    """One model family: how to build it, feed it and what conversion should produce."""

    config: Callable[[], object]
    model_class: str
    make_input: Callable[..., torch.Tensor]
    source_class: type  # the norm class the model uses
    target_class: type  # the IB class it becomes
    n_norms: int
    warmup: bool = False  # train-mode forwards first, so BatchNorm running stats are not trivial

    def build(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        model = getattr(transformers, self.model_class)(self.config())
        if self.warmup:
            model.train()
            with torch.no_grad():
                for i in range(3):
                    model(self.make_input(seed=100 + i, batch=4))
        return model.eval()


SPECS = {
    "gpt2": Spec(gpt2_config, "GPT2LMHeadModel", lambda seed=0, **_: token_input(seed), nn.LayerNorm, IBLayerNorm, 5),
    "llama": Spec(llama_config, "LlamaForCausalLM", lambda seed=0, **_: token_input(seed), LlamaRMSNorm, IBRMSNorm, 5),
    "vit": Spec(
        vit_config,
        "ViTForImageClassification",
        lambda seed=0, batch=2, dtype=torch.float32: image_input(16, batch, seed, dtype),
        nn.LayerNorm,
        IBLayerNorm,
        5,
    ),
    "resnet": Spec(
        resnet_config,
        "ResNetForImageClassification",
        lambda seed=0, batch=2, dtype=torch.float32: image_input(32, batch, seed, dtype),
        nn.BatchNorm2d,
        IBBatchNorm2d,
        8,
        warmup=True,
    ),
}
MODEL_NAMES = list(SPECS)


@pytest.fixture(scope="module")
def originals() -> dict[str, nn.Module]:
    """One eval-mode model per family, built once; tests work on deep copies."""
    return {name: spec.build() for name, spec in SPECS.items()}


def fresh(originals, name: str) -> nn.Module:
    return copy.deepcopy(originals[name])


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def norm_names(model: nn.Module, cls: type) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, cls)]


def ib_modules(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if isinstance(module, IB_CLASSES)]


# --------------------------------------------------------------------------- λ = 0 and λ > 0


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_lam_zero_gives_the_parent_model(originals, name, compression):
    original = originals[name]
    x = SPECS[name].make_input()
    converted, record = convert_norms(fresh(originals, name), compression, lam=0.0)
    assert len(record) == SPECS[name].n_norms
    torch.testing.assert_close(logits(converted, x), logits(original, x), atol=1e-5, rtol=1e-5)


# The centered placement acts in the activations' own units; freshly initialized models have
# small activations, so it needs a larger λ to change them visibly.
@pytest.mark.parametrize("placement,lam", [("standardized", 1.0), ("centered", 50.0)])
@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_positive_lam_changes_the_model(originals, name, compression, placement, lam):
    original = originals[name]
    x = SPECS[name].make_input()
    converted, _ = convert_norms(fresh(originals, name), compression, lam=lam, placement=placement)
    out = logits(converted, x)
    assert torch.isfinite(out).all()
    assert (out - logits(original, x)).abs().max().item() > 1e-3


def test_resnet_train_mode_lam_zero_matches_batchnorm_and_its_running_stats(originals):
    original = fresh(originals, "resnet").train()
    converted, _ = convert_norms(fresh(originals, "resnet").train(), "T", lam=0.0)
    x = SPECS["resnet"].make_input(seed=7, batch=4)
    with torch.no_grad():
        torch.testing.assert_close(converted(x).logits, original(x).logits, atol=1e-5, rtol=1e-5)
    before = dict(originals["resnet"].named_buffers())
    after = dict(converted.named_buffers())
    for key, value in original.named_buffers():
        torch.testing.assert_close(after[key], value, atol=1e-6, rtol=1e-5)
        if key.endswith("running_mean"):
            assert not torch.equal(value, before[key]), f"{key} was not updated by a train-mode forward"


# --------------------------------------------------------------------------- what conversion did


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_record_and_no_parent_norm_left(originals, name):
    spec = SPECS[name]
    model = fresh(originals, name)
    expected_names = norm_names(model, spec.source_class)
    assert len(expected_names) == spec.n_norms

    converted, record = convert_norms(model, "L", lam=0.5)

    assert converted is model  # converted in place, the root is not a norm
    assert len(record) == spec.n_norms
    assert [row[0] for row in record.converted] == expected_names
    assert {(row[1], row[2]) for row in record.converted} == {(spec.source_class.__name__, spec.target_class.__name__)}
    assert record.skipped == []
    assert f"converted {spec.n_norms} norm layer(s)" in str(record)

    assert norm_names(converted, spec.source_class) == []
    assert not any(isinstance(m, (nn.LayerNorm, nn.BatchNorm2d, nn.RMSNorm, LlamaRMSNorm)) for m in converted.modules())
    assert norm_names(converted, spec.target_class) == expected_names
    for module in ib_modules(converted):
        assert type(module) is spec.target_class
        assert module.compression == "L" and module.lam == 0.5


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_state_dict_keys(originals, name):
    original = originals[name]
    before = list(original.state_dict())
    converted, record = convert_norms(fresh(originals, name), "T", lam=0.5)
    after = list(converted.state_dict())
    if SPECS[name].source_class is nn.BatchNorm2d:
        assert set(before) <= set(after)
        extra = set(after) - set(before)
        expected = {f"{row[0]}.{buf}" for row in record.converted for buf in ("running_mean_psi", "running_var_psi")}
        assert extra == expected
        assert len(extra) == 2 * SPECS[name].n_norms
        # Keys common to both keep their order: a checkpoint diff reads the same.
        assert [k for k in after if k in set(before)] == before
    else:
        assert after == before
    for key, value in original.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[key], value, atol=0, rtol=0)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_same_parameter_and_buffer_objects_are_kept(originals, name):
    spec = SPECS[name]
    model = fresh(originals, name)
    params_before = dict(model.named_parameters())
    buffers_before = dict(model.named_buffers())
    first_norm = norm_names(model, spec.source_class)[0]
    norm_weight = model.get_submodule(first_norm).weight
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    converted, _ = convert_norms(model, "L", lam=0.5)

    assert converted.get_submodule(first_norm).weight is norm_weight
    params_after = dict(converted.named_parameters())
    assert params_after.keys() == params_before.keys()
    assert all(params_after[k] is p for k, p in params_before.items())
    buffers_after = dict(converted.named_buffers())
    assert all(buffers_after[k] is b for k, b in buffers_before.items())
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in converted.parameters()}

    # The optimizer built before conversion really updates the converted model's norm weights.
    converted.train()
    x = spec.make_input(batch=4)
    out = converted(x).logits
    out.float().pow(2).mean().backward()
    assert norm_weight.grad is not None and norm_weight.grad.abs().sum() > 0
    old = norm_weight.detach().clone()
    optimizer.step()
    assert not torch.equal(converted.get_submodule(first_norm).weight, old)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_parent_checkpoint_loads_strictly(originals, name):
    spec = SPECS[name]
    original = originals[name]
    x = spec.make_input(seed=3)
    # A differently initialised model, converted, then given the parent's checkpoint.
    other, _ = convert_norms(spec.build(seed=1), "L", lam=0.0)
    assert (logits(other, x) - logits(original, x)).abs().max() > 1e-3
    ib_state = {k: v.clone() for k, v in other.state_dict().items() if k.endswith("_psi")}

    result = other.load_state_dict(original.state_dict(), strict=True)

    assert result.missing_keys == [] and result.unexpected_keys == []
    torch.testing.assert_close(logits(other, x), logits(original, x), atol=1e-5, rtol=1e-5)
    # IB-only buffers absent from the checkpoint keep their values.
    for key, value in ib_state.items():
        torch.testing.assert_close(other.state_dict()[key], value, atol=0, rtol=0)

    # And an IB model's own checkpoint round-trips (λ > 0, psi buffers included).
    source, _ = convert_norms(fresh(originals, name), "S", lam=0.7)
    if spec.warmup:
        source.train()
        with torch.no_grad():
            source(spec.make_input(seed=11, batch=4))
        source.eval()
    target, _ = convert_norms(spec.build(seed=2), "S", lam=0.7)
    target.load_state_dict(source.state_dict(), strict=True)
    torch.testing.assert_close(logits(target, x), logits(source, x), atol=0, rtol=0)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_training_flag_and_dtype_are_kept(originals, name):
    spec = SPECS[name]
    train_model, _ = convert_norms(fresh(originals, name).train(), "L", lam=0.5)
    assert ib_modules(train_model) and all(m.training for m in ib_modules(train_model))
    eval_model, _ = convert_norms(fresh(originals, name), "L", lam=0.5)
    assert not any(m.training for m in ib_modules(eval_model))

    original64 = fresh(originals, name).double()
    model64, _ = convert_norms(copy.deepcopy(original64), "L", lam=0.0)
    for module in ib_modules(model64):
        tensors = list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]
        assert tensors and all(t.dtype == torch.float64 for t in tensors)
    x = spec.make_input(seed=5)
    if x.is_floating_point():
        x = x.double()
    out = logits(model64, x)
    assert out.dtype == torch.float64
    # LlamaRMSNorm computes in float32 even for float64 input; the IB layer keeps float64.
    tol = 1e-6 if name == "llama" else 1e-10
    torch.testing.assert_close(out, logits(original64, x), atol=tol, rtol=tol)
    # λ > 0 also runs in float64 (the psi buffers of batch layers are float64 too).
    converted64, _ = convert_norms(copy.deepcopy(original64), "T", lam=0.5)
    assert logits(converted64, x).dtype == torch.float64


# --------------------------------------------------------------------------- transformers integration


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_ib_model_from_config(name, tmp_path):
    spec = SPECS[name]
    torch.manual_seed(0)
    model, record = ib_model_from_config(spec.config(), "T", 0.5)
    assert type(model).__name__ == spec.model_class
    assert len(record) == spec.n_norms
    grouping = spec.target_class.grouping
    options = {"compression": "T", "lam": 0.5, "learnable_lam": False, "placement": DEFAULT_VARIANTS[grouping].placement}
    expected = {"options": {grouping: options}, "converted": spec.n_norms}
    assert model.config.ibnorm == expected
    modules = ib_modules(model)
    assert len(modules) == spec.n_norms
    assert all(type(m) is spec.target_class and m.compression == "T" and m.lam == 0.5 for m in modules)
    # The settings travel with the config.
    model.config.save_pretrained(tmp_path)
    assert transformers.AutoConfig.from_pretrained(tmp_path).ibnorm == model.config.ibnorm


def test_ib_model_from_config_with_auto_class():
    torch.manual_seed(0)
    model, record = ib_model_from_config(gpt2_config(), "S", 0.25, auto_class=transformers.AutoModel)
    assert type(model).__name__ == "GPT2Model"
    assert len(record) == 5
    assert model.config.ibnorm["options"]["layer"]["compression"] == "S" and model.config.ibnorm["options"]["layer"]["lam"] == 0.25


def test_convert_hf_model(originals):
    model = fresh(originals, "llama")
    converted, record = convert_hf_model(model, "L", 0.3, learnable_lam=True, placement="centered", exclude=["model.norm"])
    assert converted is model
    assert len(record) == 4
    options = {"compression": "L", "lam": 0.3, "learnable_lam": True, "placement": "centered"}
    assert converted.config.ibnorm == {"options": {"rms": options}, "converted": 4}
    assert type(converted.model.norm) is LlamaRMSNorm
    for module in ib_modules(converted):
        assert module.lam_raw is not None and module.lam_value() == pytest.approx(0.3, rel=1e-5)
    # The learnable λ gets a gradient through the whole model.
    converted.train()
    converted(token_input()).logits.pow(2).mean().backward()
    assert all(m.lam_raw.grad is not None and m.lam_raw.grad.abs() > 0 for m in ib_modules(converted))


# --------------------------------------------------------------------------- include / exclude


def test_exclude_by_name_keeps_that_layer(originals):
    model = fresh(originals, "gpt2")
    ln_f = model.transformer.ln_f
    converted, record = convert_norms(model, "L", lam=0.5, exclude=["transformer.ln_f"])
    assert converted.transformer.ln_f is ln_f and type(ln_f) is nn.LayerNorm
    assert len(record) == 4
    assert [row[0] for row in record.converted] == [
        f"transformer.h.{i}.{ln}" for i in range(2) for ln in ("ln_1", "ln_2")
    ]
    assert len(ib_modules(converted)) == 4


def test_exclude_by_pattern_and_include_by_pattern(originals):
    converted, record = convert_norms(fresh(originals, "gpt2"), exclude=["transformer.h.*.ln_1"])
    assert sorted(row[0] for row in record.converted) == [
        "transformer.h.0.ln_2",
        "transformer.h.1.ln_2",
        "transformer.ln_f",
    ]
    assert all(type(block.ln_1) is nn.LayerNorm for block in converted.transformer.h)

    converted, record = convert_norms(fresh(originals, "gpt2"), include=["transformer.h.0.*"])
    assert [row[0] for row in record.converted] == ["transformer.h.0.ln_1", "transformer.h.0.ln_2"]
    assert type(converted.transformer.h[1].ln_1) is nn.LayerNorm

    # A single string is one pattern, not a sequence of characters.
    _, record = convert_norms(fresh(originals, "gpt2"), include="transformer.ln_f")
    assert [row[0] for row in record.converted] == ["transformer.ln_f"]


def test_include_and_exclude_by_class(originals):
    _, record = convert_norms(fresh(originals, "gpt2"), include=[nn.LayerNorm])
    assert len(record) == 5
    _, record = convert_norms(fresh(originals, "llama"), include=[LlamaRMSNorm])
    assert len(record) == 5
    _, record = convert_norms(fresh(originals, "resnet"), include=[nn.BatchNorm2d])
    assert len(record) == 8

    # A class the model does not use: nothing changes.
    model = fresh(originals, "llama")
    state = model.state_dict()
    converted, record = convert_norms(model, include=[nn.LayerNorm])
    assert len(record) == 0 and record.skipped == []
    assert not ib_modules(converted)
    assert converted.state_dict().keys() == state.keys()

    _, record = convert_norms(fresh(originals, "vit"), exclude=[nn.LayerNorm])
    assert len(record) == 0
    _, record = convert_norms(fresh(originals, "vit"), include=[nn.LayerNorm], exclude=["vit.layernorm"])
    assert len(record) == 4


def test_bad_selector_is_rejected(originals):
    with pytest.raises(TypeError, match="include"):
        convert_norms(fresh(originals, "gpt2"), include=[3])
    with pytest.raises(TypeError, match="exclude"):
        convert_norms(fresh(originals, "gpt2"), exclude=[None])


@pytest.mark.parametrize(
    "module_path, class_name",
    [
        ("transformers.models.qwen3_next.modeling_qwen3_next", "Qwen3NextRMSNorm"),
        ("transformers.models.vaultgemma.modeling_vaultgemma", "VaultGemmaRMSNorm"),
    ],
)
def test_zero_centred_rmsnorm_is_skipped_or_kept_exact(module_path, class_name):
    cls = getattr(pytest.importorskip(module_path), class_name, None)
    if cls is None:
        pytest.skip(f"{class_name} not in this transformers")
    torch.manual_seed(0)
    model = nn.Sequential(cls(8))
    with torch.no_grad():
        model[0].weight.normal_(0.0, 0.3)  # stored as (scale - 1)
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = model(x)
    converted, record = convert_norms(model, "L", lam=0.0)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), expected, atol=1e-5, rtol=1e-5)
    assert record.converted == [] and record.skipped[0][:2] == ("0", class_name)
    assert "1 + weight" in str(record)


def test_exclude_selects_the_whole_subtree(originals):
    converted, record = convert_norms(fresh(originals, "gpt2"), exclude=["transformer.h.0"])
    names = [row[0] for row in record.converted]
    assert names == ["transformer.h.1.ln_1", "transformer.h.1.ln_2", "transformer.ln_f"]
    converted, record = convert_norms(fresh(originals, "gpt2"), include=["transformer.h.1"])
    assert [row[0] for row in record.converted] == ["transformer.h.1.ln_1", "transformer.h.1.ln_2"]


def test_root_norm_is_replaced_by_a_new_root():
    torch.manual_seed(0)
    ln = nn.LayerNorm(8)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    new, record = convert_norms(ln, "T", lam=0.0)
    assert type(new) is IBLayerNorm and new is not ln
    assert new.weight is ln.weight and new.bias is ln.bias
    assert record.converted == [("", "LayerNorm", "IBLayerNorm")]
    x = torch.randn(3, 8)
    torch.testing.assert_close(new(x), ln(x), atol=1e-6, rtol=1e-5)

    bn = nn.BatchNorm2d(4).eval()
    new_bn, record = convert_norms(bn, "L", lam=0.5)
    assert type(new_bn) is IBBatchNorm2d and not new_bn.training
    assert new_bn.running_mean is bn.running_mean and new_bn.running_var is bn.running_var
    assert new_bn.num_batches_tracked is bn.num_batches_tracked
    assert record.converted == [("", "BatchNorm2d", "IBBatchNorm2d")]


# --------------------------------------------------------------------------- torch.compile


def _lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@pytest.mark.slow
def test_compiled_gpt2_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    config = gpt2_config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0)
    model = transformers.GPT2LMHeadModel(config).train()
    model, record = convert_norms(model, "L", lam=0.5)
    assert len(record) == 5
    with torch.no_grad():  # non-trivial affines, so their gradients differ from layer to layer
        for module in ib_modules(model):
            module.weight.normal_(1.0, 0.2)
            module.bias.normal_(0.0, 0.2)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    ids = token_input()

    out_eager = eager(ids).logits
    _lm_loss(out_eager, ids).backward()
    out_compiled = compiled(ids).logits
    _lm_loss(out_compiled, ids).backward()

    torch.testing.assert_close(out_compiled, out_eager, atol=1e-4, rtol=1e-4)
    grads_eager = {n: p.grad for n, p in eager.named_parameters()}
    checked = 0
    for name, param in model.named_parameters():
        if ".ln_" in name or name.startswith("transformer.h.0.attn") or name == "transformer.wte.weight":
            assert param.grad is not None, name
            torch.testing.assert_close(param.grad, grads_eager[name], atol=1e-4, rtol=1e-4, msg=name)
            checked += 1
    assert checked >= 10
    torch._dynamo.reset()


# --------------------------------------------------------------------------- ONNX


class LogitsOnly(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values).logits


@pytest.mark.slow  # a fresh process, a build or an export: seconds each
@pytest.mark.parametrize("compression", ["L", "T"])
def test_resnet_onnx_export_matches_torch(originals, compression, tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    spec = SPECS["resnet"]
    model, _ = convert_norms(fresh(originals, "resnet").train(), compression, lam=0.5)
    with torch.no_grad():
        for i in range(3):
            model(spec.make_input(seed=200 + i, batch=4))
    model.eval()
    wrapped = LogitsOnly(model).eval()
    x = spec.make_input(seed=9)
    path = tmp_path / f"resnet_{compression}.onnx"

    torch.onnx.export(wrapped, (x,), str(path), dynamo=True)

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (input_name,) = [i.name for i in session.get_inputs()]
    (onnx_out,) = session.run(None, {input_name: x.numpy()})
    with torch.no_grad():
        expected = wrapped(x)
    torch.testing.assert_close(torch.from_numpy(onnx_out), expected, atol=1e-4, rtol=1e-4)
    # The exported graph really compresses: it differs from the λ = 0 model.
    parent, _ = convert_norms(fresh(originals, "resnet"), compression, lam=0.0)
    assert (torch.from_numpy(onnx_out) - logits(parent, x)).abs().max() > 1e-3
