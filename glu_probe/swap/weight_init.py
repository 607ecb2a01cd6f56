"""Initialising a new block the way its host initialises its own MLPs (:func:`host_init`).

Hugging Face hosts: their own ``_init_weights`` on the new layers and on a stand-in of the
source block, with the config's width keys reading the new width (plus T5 / ``initializer_range``
fallbacks); timm hosts: the family's rules (EVA / BEiT, ConvNeXt, MLP-Mixer, the ViT init and its
gate convention), drawn in float32. These are per-library conventions, kept apart from the swap
logic that calls them. (The module is ``weight_init``, not ``host_init``:
``glu_probe.swap.host_init`` is the function.)
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from .hosts import _ancestors, _hf_config, _is_pretrained
from .origin import _stand_in


def _is_timm_host(model: nn.Module) -> bool:
    return any(c.__module__.startswith("timm.") for c in type(model).__mro__)


def _is_timm_model(model: nn.Module) -> bool:
    """A timm *model* (not one of its layers): a ``timm.models`` class with ``forward_features``,
    or the wrapper ``timm.create_model(..., features_only=True)`` returns (``FeatureListNet``
    and its kin hold the model's stages, not the model: without ``forward_features`` they were
    not taken for a model, and a backbone's swapped blocks got another init; review, s24)."""
    module = type(model).__module__
    if module == "timm.models._features":
        return type(model).__name__.startswith("Feature") and type(model).__name__.endswith("Net")
    return module.startswith("timm.models.") and hasattr(model, "forward_features")


def _timm_family(host: nn.Module, name: str) -> str:
    """The timm family module (``timm.models.convnext``, ...) whose init conventions apply to
    the block at ``name`` inside ``host``: the host's own, or for a ``features_only`` wrapper
    (``timm.models._features``) that of the outermost module between it and the block that
    belongs to a family (its stages: ``stages_0`` is a ``ConvNeXtStage``)."""
    module = type(host).__module__
    if not module.startswith("timm.models._"):
        return module
    parts = name.split(".")
    for k in range(1, len(parts)):
        inner = type(host.get_submodule(".".join(parts[:k]))).__module__
        if inner.startswith("timm.models.") and not inner.startswith("timm.models._"):
            return inner
    return module


def _init_host(root: nn.Module, path: str) -> tuple[str, nn.Module, str] | None:
    """The sub-model whose init conventions apply to the block at ``path``: its nearest ancestor
    that is a Hugging Face ``PreTrainedModel`` (``"hf"``) or a timm model (``"timm"``); a root
    that only holds a config (``"hf"``) or is a timm module (``"timm"``) as a last resort."""
    for p, m in _ancestors(root, path):
        if _is_pretrained(m):
            return p, m, "hf"
        if _is_timm_model(m):
            return p, m, "timm"
    if _hf_config(root) is not None:
        return "", root, "hf"
    if _is_timm_host(root):
        return "", root, "timm"
    return None


def _source_roles(source: nn.Module) -> tuple[tuple[str, ...], str] | None:
    """Child names of the source block's input layers (the gate and up projections of a split
    gated block, else the one input layer) and of its output layer, for a block the swap
    *replaces* (not a layer it rewires) and that holds nothing else with parameters."""
    for ins, out in ((("gate_proj", "up_proj"), "down_proj"), (("c_fc",), "c_proj")):
        if all(hasattr(source, n) for n in (*ins, out)):
            return ins, out
    from glu_probe.swap.structural import _analyse

    form = _analyse(source)
    if form is None:
        return None
    names = {id(c): n for n, c in source.named_children()}
    inputs = (names[id(form.fc1)],) + ((names[id(form.up)],) if form.up is not None else ())
    return inputs, names[id(form.fc2)]


def _new_layers(block: nn.Module) -> tuple[list[nn.Module], nn.Module | None]:
    """Input layers (``fc1``, or ``fc1_g`` and ``fc1_x``) and output layer of a new block."""
    inner = getattr(block, "mlp", block)  # ResidualAddMLP / ResidualNormMLP hold it as .mlp
    ins = [
        getattr(inner, n)
        for n in ("fc1", "fc1_g", "fc1_x")
        if isinstance(getattr(inner, n, None), nn.Module)
    ]
    out = getattr(inner, "fc2", None)
    return ins, out if isinstance(out, nn.Module) else None


def _is_t5_block(source: nn.Module | None) -> bool:
    return (
        source is not None
        and hasattr(source, "wo")
        and (hasattr(source, "wi") or hasattr(source, "wi_0"))
    )


def _fan_in(layer: nn.Module | None) -> int | None:
    """Input width of a ``Linear`` / ``Conv2d`` (the hidden width, for an output layer)."""
    width = getattr(layer, "in_features", None) or getattr(layer, "in_channels", None)
    return width if isinstance(width, int) else None


@contextlib.contextmanager
def _config_width(config: Any, old: Iterable[int | None], new: int | None) -> Iterator[None]:
    """Inside the ``with`` statement, the config's MLP-width keys (:data:`WIDTH_KEYS` of the
    structural adapter: ``d_ff``, ``intermediate_size``, ...) that hold one of the widths
    ``old`` (the source's, and that of the host's own block first swapped out there: a nested
    config copy, T5's encoder and decoder stacks, keeps that one) read ``new``, the width the
    swap writes there afterwards; restored on exit. An ``_init_weights`` that scales by the
    configured width (T5's ``wo``: ``factor/√d_ff``) then initialises the new block as it would
    a block of a host rebuilt from the updated config."""
    from glu_probe.swap.structural import WIDTH_KEYS

    olds = {w for w in old if w is not None and w != new}
    saved: dict[str, Any] = {}
    if config is not None and olds and new is not None:
        for key in WIDTH_KEYS:
            value = getattr(config, key, None)
            if type(value) is int and value in olds:
                saved[key] = value
    try:
        for key in saved:
            setattr(config, key, new)
        yield
    finally:
        for key, value in saved.items():
            setattr(config, key, value)


def _hf_init(
    host: nn.Module,
    block: nn.Module,
    source: nn.Module | None,
    *,
    class_rule: bool = False,
    origin: nn.Module | None = None,
) -> bool:
    """The host ``PreTrainedModel``'s own ``_init_weights``: on every new sub-module (as HF's
    ``initialize_weights`` does), then on a stand-in of the source block holding the new layers
    under the source's names (so class-specific rules apply: CLIP's MLP stds, GPT-2's scaled
    ``c_proj``, T5's ``wi``/``wo``), with the config's width keys reading the new width
    (:func:`_config_width`). ``False`` where the host has no ``_init_weights`` or it fails, or
    (``class_rule=True``) where no stand-in can be built. ``origin``: the host's own block
    whose class and layer names the stand-in takes (:func:`_origin_of`; ``source`` itself by
    default), ``source`` the block replaced now (its width is the config's)."""
    init_fn = getattr(host, "_init_weights", None)
    if not callable(init_fn):
        return False
    ref = origin if origin is not None else source
    roles = _source_roles(ref) if ref is not None else None
    ins, out = _new_layers(block)
    can_stand_in = roles is not None and bool(ins) and out is not None
    if class_rule and not can_stand_in:
        return False
    old_widths: tuple[int | None, ...] = ()
    if roles is not None and source is not None and ref is not None:
        # the replaced block's hidden width (its output layer under the host's name, or, for a
        # block an earlier swap built, its fc2) and the host's own block's
        old_widths = (
            _fan_in(getattr(source, roles[1], None)) or _fan_in(_new_layers(source)[1]),
            _fan_in(getattr(ref, roles[1], None)),
        )
    try:
        with torch.no_grad(), _config_width(_hf_config(host), old_widths, _fan_in(out)):
            for m in block.modules():
                if m is not block and not isinstance(m, nn.Sequential):
                    init_fn(m)
            if can_stand_in:
                assert roles is not None and ref is not None and out is not None
                for lin in ins:
                    init_fn(_stand_in(ref, {**dict.fromkeys(roles[0], lin), roles[1]: out}))
    except Exception:
        return False
    return True


#: timm families whose models initialise their Linear layers with their own ``_init_weights``
#: (trunc_normal(0.02), zero bias) and then, always, divide ``blocks[i].mlp.fc2`` (and the
#: attention projection) by ``sqrt(2·(i+1))`` in ``fix_init_weight``.
_DEPTH_RESCALED = ("timm.models.eva", "timm.models.beit")


def _redraw_packed_up_half(block: Any, fn: Any, name: str) -> None:
    """Re-draw the up half of a packed gated block's ``fc1`` as ``fn`` draws a separate
    ``nn.Linear(in, h)`` named ``<name>.fc1_x`` (timm ``SwiGLU``'s up projection).

    ``fn`` saw ``fc1`` as one layer of ``2h`` rows: an init whose scale depends on fan-out
    (xavier_uniform: timm ViT's ``jax`` / ``moco`` modes, MLP-Mixer / ResMLP) gave the up half
    ``√((in + h)/(in + 2h))`` of the std timm's ``SwiGLU`` gets (0.74x at h = 4·in). The gate
    half is left as the host left it: these inits end with the block's ``init_weights`` (timm
    ``SwiGLU``'s gate rule), which ``fn`` has run.
    """
    from timm.models._manipulate import named_apply

    from ..modules import GatedMLP

    if not (isinstance(block, GatedMLP) and block.packed and type(block.fc1) is nn.Linear):
        return
    w, b = block.up_params()
    stand = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    named_apply(fn, stand, name=f"{name}.fc1_x", include_root=True)
    w.copy_(stand.weight)
    if b is not None:
        b.copy_(stand.bias)


@contextlib.contextmanager
def _init_in_float32(block: nn.Module) -> Iterator[None]:
    """Hold ``block``'s 16-bit floating tensors in float32 for an init, then cast them back.

    torch's ``trunc_normal_`` drawn in fp16/bf16 is far off (std 0.036 / 0.097 for 0.02, values
    clamped at ±2: review, session 25); a host's own blocks are initialised in float32 and cast.
    The tensors keep their identity (``.data`` is swapped), so optimisers and hooks still hold
    them.
    """
    low = [
        (t, t.dtype)
        for t in [*block.parameters(), *block.buffers()]
        if t.dtype in (torch.float16, torch.bfloat16)
    ]
    for t, _ in low:
        t.data = t.data.float()
    try:
        yield
    finally:
        for t, dtype in low:
            t.data = t.data.to(dtype)


def _timm_init(host: nn.Module, name: str, block: Any) -> None:
    """timm conventions, by family (see :func:`host_init`)."""
    import sys

    from timm.models._manipulate import named_apply

    family_name = _timm_family(host, name)
    family = sys.modules.get(family_name)
    fn = getattr(family, "_init_weights", None)
    with torch.no_grad():
        own_init: Any = getattr(host, "_init_weights", None)
        if family_name in _DEPTH_RESCALED and callable(own_init):
            # EVA / EVA-02 / BEiT: the model's own _init_weights on the Linear layers only
            # (trunc_normal(0.02), zero bias; gates included: EVA never calls SwiGLU's
            # init_weights), then fix_init_weight's 1/sqrt(2·(layer+1)) on blocks[layer].mlp.fc2.
            for m in block.modules():
                if isinstance(m, nn.Linear):
                    own_init(m)
            hit = re.fullmatch(r"blocks\.(\d+)\.mlp", name)
            if hit and callable(getattr(host, "fix_init_weight", None)):
                _, out = _new_layers(block)
                if isinstance(out, nn.Linear):
                    out.weight.div_(math.sqrt(2.0 * (int(hit.group(1)) + 1)))
            return
        if (
            not hasattr(host, "weight_init_mode")
            and callable(fn)
            and family_name
            in (
                "timm.models.convnext",
                "timm.models.mlp_mixer",
            )
        ):
            # ConvNeXt: trunc_normal(0.02) / zero bias for Linear *and* Conv2d (conv_mlp);
            # MLP-Mixer / ResMLP: xavier_uniform, biases N(0, 1e-6²) in blocks named *mlp*.
            try:
                named_apply(fn, block, name=name, include_root=True)
                _redraw_packed_up_half(block, fn, name)
                return
            except Exception:  # e.g. a bias-free layer ConvNeXt's init does not expect
                pass
        from timm.models.vision_transformer import get_init_weights_vit

        mode = getattr(host, "weight_init_mode", "") or ""
        vit_init = get_init_weights_vit(mode)
        convs: tuple[type, ...] = (nn.Conv1d,) if "jax" in mode else (nn.Conv1d, nn.Conv2d)

        def init(module: nn.Module, name: str = "") -> None:
            # The ViT inits ('' and moco) draw nn.Linear only: the 1x1 convs of a use_conv
            # block (FocalNet, a ConvNeXt features_only backbone) kept torch's default,
            # 2-5x timm's scale (review, session 24). They get trunc_normal(0.02) and zero
            # bias, the rule of every timm family with conv MLPs, before the block's own
            # init_weights (the gate rule; named_apply walks children first).
            if isinstance(module, convs):
                weight, bias = module.weight, module.bias
                assert isinstance(weight, torch.Tensor)
                nn.init.trunc_normal_(weight, std=0.02)
                if isinstance(bias, torch.Tensor):
                    nn.init.zeros_(bias)
            else:
                vit_init(module, name)

        named_apply(init, block, name=name, include_root=True)
        _redraw_packed_up_half(block, vit_init, name)
        hit = re.fullmatch(r"(?:.*\.)?blocks\.(\d+)\.mlp", name)
        if getattr(host, "fix_init", False) and hit and hasattr(block, "fc2"):
            block.fc2.weight.div_(math.sqrt(2.0 * (int(hit.group(1)) + 1)))


def host_init(
    root: nn.Module,
    path: str,
    block: Any,
    *,
    source: nn.Module | None = None,
    origin: nn.Module | None = None,
) -> None:
    """Initialise a new block the way its host initialises its own MLPs.

    The host is the sub-model that owns the block: its nearest ancestor that is a Hugging Face
    ``PreTrainedModel`` or a timm model (so a model wrapped in a ``LightningModule`` and the
    towers of a composite model get their own conventions); ``source`` is the block being
    replaced, and ``origin`` the host's own block that was first swapped out at this place,
    whose class and layer names decide the rules below (``source`` by default). A second swap
    of the same place (``swiglu`` then back to ``gelu``) thus initialises as the first did:
    T5's, GPT-2's and CLIP's rules see their own block's class, not a glu-probe block's.

    * Hugging Face: the host's own ``_init_weights``, applied to every new sub-module (plain
      layers: N(0, initializer_range²) or as the family does, zero biases) and then to a
      stand-in of the source block holding the new layers under the source's names (the
      source's class, fresh hook dicts: nothing of the live model is touched), so that a
      class-specific rule applies as to the source: GPT-2's scaled output projection
      ``r / sqrt(2 · n_layer)``, CLIP's ``fc1`` / ``fc2`` stds, T5's ``wi`` / ``wo`` rule
      (``factor/√d_model``, ``factor/√d_ff``; T5 v1.0 and v1.1, MT5, ...), and no T5 rule
      where the host's ``_init_weights`` has none for the block (Pix2Struct's vision MLP, which
      has ``wi``/``wo`` layers but gets N(0, initializer_range²)). While it runs, the config's
      MLP-width keys (``d_ff``, ``intermediate_size``, ``n_inner``, ``hidden_dim``,
      ``ffn_dim``) that hold the source's width read the new width, the value the swap writes
      there: a width-scaled rule (T5's ``wo``) gives what a host rebuilt from the updated
      config gives its own blocks. For gated blocks both input layers get the rule of the
      source's input layer(s).
    * Hugging Face fallbacks: a T5-family block (``source`` with ``wi``/``wo`` layers, config
      with ``initializer_factor``) whose host has no usable ``_init_weights`` (or whose
      stand-in cannot be built), or a block with no ``source`` in a host whose config has
      ``initializer_factor`` and no ``initializer_range``: T5's rule, N(0, (factor/√fan_in)²),
      zero biases. Otherwise, if the host has no ``_init_weights`` (or it fails): N(0, r²)
      with ``r`` the config's ``initializer_range`` or ``init_std``.
    * timm EVA / EVA-02 and BEiT: the model's own ``_init_weights`` on every ``Linear`` of the
      new block (trunc_normal(0.02), zero bias; a gated block's gate too, as EVA's own
      ``SwiGLU`` / ``GluMlp`` get it: EVA never calls their ``init_weights``), then
      ``fix_init_weight``'s depth rescaling of ``blocks[i].mlp.fc2`` by ``1/sqrt(2·(i+1))``.
      Inner norms keep their fresh (ones / zeros) init, as EVA leaves them.
    * a ``features_only`` wrapper (``FeatureListNet``, ...) is the model it was made from:
      the family of its stages applies.
    * timm ConvNeXt / MLP-Mixer (and ResMLP): the family's own ``_init_weights`` (ConvNeXt:
      trunc_normal(0.02) and zero bias for ``Linear`` and the 1x1 ``Conv2d`` of ``conv_mlp``;
      Mixer: xavier-uniform weights and N(0, 1e-6²) biases).
    * other timm models: the ViT init (``weight_init_mode``: '' -> trunc_normal(0.02) / zero
      bias, or jax / moco; the 1x1 convs of a ``use_conv`` block, which the ViT inits other
      than jax leave alone, get trunc_normal(0.02) / zero bias, the rule of timm's families
      with conv MLPs such as FocalNet), applied with timm's own ``named_apply`` so that blocks
      with an ``init_weights()`` (timm's ``SwiGLU``, our ``GatedMLP``) get it exactly as in a
      freshly built timm ViT (gate weight N(0, 1e-6²), gate bias 1); plus ``fix_init`` rescaling of
      ``fc2`` by ``1/sqrt(2·(layer+1))``. This is the convention of the ViT family; other timm
      families (Swin, CaiT, ...) use the same trunc_normal(0.02) / zero-bias Linear init, and
      their new gated blocks get the ViT gate convention above. Depth rescalings other than
      ViT's ``fix_init`` and EVA's / BEiT's ``fix_init_weight`` are not applied.
    * anything else: the block keeps ``nn.Linear``'s default init.
    """
    found = _init_host(root, path)
    if found is None:
        return
    host_path, host, kind = found
    name = path[len(host_path) + 1 :] if host_path else path
    if kind == "timm":
        with _init_in_float32(block):
            _timm_init(host, name, block)
        return
    config = _hf_config(host)
    if config is None:
        return
    # T5's rule, N(0, (factor/√fan_in)²), is a fallback: the host's own _init_weights applies it
    # to its T5-family blocks through the stand-in (with d_ff reading the new width) and gives
    # other blocks with wi/wo layers (Pix2Struct's vision MLP) the host's rule for them.
    ref = origin if origin is not None else source
    t5_rule = hasattr(config, "initializer_factor") and (
        _is_t5_block(ref) or (source is None and not hasattr(config, "initializer_range"))
    )
    class_rule = _is_t5_block(ref)
    if (
        not (t5_rule and source is None)
        and _is_pretrained(host)
        and _hf_init(host, block, source, class_rule=class_rule, origin=ref)
    ):
        return
    if t5_rule:
        factor = float(config.initializer_factor)
        with torch.no_grad():
            for m in block.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, mean=0.0, std=factor / math.sqrt(m.in_features))
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        return
    std_key = next((k for k in ("initializer_range", "init_std") if hasattr(config, k)), None)
    if std_key is not None:
        std = float(getattr(config, std_key))
        with torch.no_grad():
            for m in block.modules():
                if isinstance(m, nn.Linear | nn.Conv2d):
                    nn.init.normal_(m.weight, mean=0.0, std=std)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm | nn.RMSNorm) and hasattr(m, "reset_parameters"):
                    m.reset_parameters()
            n_layer = getattr(config, "n_layer", None)
            if getattr(config, "model_type", "") == "gpt2" and n_layer and hasattr(block, "fc2"):
                nn.init.normal_(block.fc2.weight, mean=0.0, std=std / math.sqrt(2 * n_layer))
