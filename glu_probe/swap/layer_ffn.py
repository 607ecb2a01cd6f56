"""Adapter for feed-forward layers that live directly in a transformer layer (no MLP module).

OPT, BART and its relatives (mBART, Marian, Pegasus, BlenderBot, M2M100/NLLB, PLBart), XGLM,
BioGPT, Whisper and Speech2Text keep ``fc1``, ``activation_fn`` and ``fc2`` on the decoder (or
encoder) layer itself (ALBERT: ``ffn``, ``activation``, ``ffn_output``; :data:`NAMES`) and
compute, inside the layer's ``forward``,

    h = fc2(D_a(activation_fn(fc1(x))))        D_a: dropout(p=activation_dropout), BART family

followed by the layer's own output dropout and residual. There is no MLP module to replace, so
the adapter matches the *layer* and rewires it: ``fc1`` becomes the whole new block (its hidden
dropout is the layer's ``activation_dropout``, which the layer then sets to 0), ``activation_fn``
and ``fc2`` become ``nn.Identity``. The layer then computes its output dropout and residual on
the new block's output, as before. State-dict keys move from ``fc1.weight`` to
``fc1.fc1.weight`` etc.; a model rebuilt from its config and swapped the same way has the same
keys.

The rewiring is checked before it is trusted: the layer is run once as it is and once rewired
with a block built from its *own* ``fc1``, ``activation_fn`` and ``fc2`` (the same computation, if
the layer uses them only as ``fc2(act(fc1 x))``), with fresh float32 weights on the CPU
(``torch.func.functional_call``, a private generator, eval mode, the layer's training flags
restored) on a ``(1, 4, d)`` input; the two outputs must agree to a few roundings. A layer that
cannot run on the hidden states alone, or that uses its ``fc1``/``fc2`` in any other way, is not
matched (and is reported by :func:`~glu_probe.swap.swap_mlp` like any other unrecognised model).
The verdict is cached per layer structure: one check per model.

Host config: the width key (``ffn_dim``, ``intermediate_size``, ...) is updated only where it
holds the blocks' width; BART's separate ``encoder_ffn_dim`` / ``decoder_ffn_dim`` are left
alone (the ``glu_probe_swap`` record holds the swap).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor, nn

from glu_probe._settings import plain_settings
from glu_probe.modules import MLP, GatedMLP, activation_name
from glu_probe.swap.base import MLPAdapter, MLPSpec, UnsupportedModelError, spec_from_glu_probe
from glu_probe.swap.structural import (
    _CheckRun,
    _close,
    _plain_linear,
    width_key,
)

__all__ = ["LayerFFNAdapter"]


class _Chain(nn.Module):
    """``fc2(act(fc1 x))`` from the layer's own modules (the check's stand-in block)."""

    def __init__(self, fc1: nn.Module, act: nn.Module, fc2: nn.Module) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = fc1, act, fc2

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _is_param_free(m: Any) -> bool:
    return isinstance(m, nn.Module) and not any(True for _ in m.parameters())


#: (input layer, activation, output layer) attribute names of the families this adapter knows:
#: OPT / BART / XGLM / BioGPT / Whisper / ..., and ALBERT (whose one layer serves every depth).
NAMES: tuple[tuple[str, str, str], ...] = (
    ("fc1", "activation_fn", "fc2"),
    ("ffn", "activation", "ffn_output"),
)


def _names(layer: nn.Module, rewired: bool) -> tuple[str, str, str] | None:
    """The name triple under which ``layer`` holds a native (or, ``rewired``, a swapped) FFN."""
    for up, act, down in NAMES:
        a, f, b = (getattr(layer, n, None) for n in (up, act, down))
        if rewired:
            ok = (
                isinstance(a, MLP | GatedMLP)
                and isinstance(f, nn.Identity)
                and isinstance(b, nn.Identity)
            )
        else:
            ok = (
                _plain_linear(a)
                and _plain_linear(b)
                and a.out_features == b.in_features  # type: ignore[union-attr]
                and _is_param_free(f)
            )
        if ok:
            return up, act, down
    return None


def _rewired(layer: nn.Module) -> bool:
    """Already swapped by this adapter: the input layer is a glu-probe block, the rest
    identities."""
    return _names(layer, True) is not None


def _native(layer: nn.Module) -> bool:
    return _names(layer, False) is not None


def _structure(layer: nn.Module, act_name: str) -> tuple[Any, ...]:
    params = tuple((name, tuple(p.shape)) for name, p in layer.named_parameters())
    return (type(layer), repr(getattr(layer, act_name)), params, plain_settings(layer))


_VERDICTS: dict[tuple[Any, ...], bool] = {}


def _output(out: Any) -> Any:
    return out[0] if isinstance(out, tuple | list) and out else out


def _check(layer: nn.Module, names: tuple[str, str, str]) -> bool:
    """The layer computes ``fc2(activation_fn(fc1 x))`` on its hidden states (module docstring)."""
    up_name, act_name, down_name = names
    fc1: Any = getattr(layer, up_name)
    fc2: Any = getattr(layer, down_name)
    act: Any = getattr(layer, act_name)
    gen = torch.Generator().manual_seed(0)
    fresh: dict[str, Tensor] = {}
    for name, p in layer.named_parameters():
        if name.endswith("weight") and p.ndim == 2:
            fresh[name] = torch.randn(*p.shape, generator=gen) / math.sqrt(p.shape[1])
        elif name.endswith("weight") and p.ndim == 1:  # norm scales
            fresh[name] = 1.0 + 0.1 * torch.randn(*p.shape, generator=gen)
        else:
            fresh[name] = 0.1 * torch.randn(*p.shape, generator=gen)
    for name, b in layer.named_buffers():
        if b.device.type == "meta":
            return False
        fresh[name] = b.detach().to("cpu")
    d = int(fc1.in_features)
    x = torch.randn(1, 4, d, generator=gen)
    rewired = {}
    for k, v in fresh.items():
        if k.startswith(f"{up_name}."):
            k = f"{up_name}.fc1.{k[len(up_name) + 1 :]}"
        elif k.startswith(f"{down_name}."):
            k = f"{up_name}.fc2.{k[len(down_name) + 1 :]}"
        rewired[k] = v

    def run(tensors: dict[str, Tensor]) -> Any:
        # (x, None, None): transformers 4.x's BART encoder layer has three required arguments;
        # without it every encoder layer failed this check and was left out without a word
        for args in ((x,), (x, None), (x, None, None)):
            try:
                with torch.random.fork_rng(devices=[]), torch.no_grad():
                    return _output(torch.func.functional_call(layer, tensors, args))
            except TypeError:
                continue
        raise TypeError("the layer does not run on its hidden states alone")

    with _CheckRun(layer, False, silence_hooks=True):
        try:
            ref = run(fresh)
            setattr(layer, up_name, _Chain(fc1, act, fc2))
            setattr(layer, down_name, nn.Identity())
            setattr(layer, act_name, nn.Identity())
            got = run(rewired)
        except Exception:
            return False
        finally:
            setattr(layer, up_name, fc1)
            setattr(layer, down_name, fc2)
            setattr(layer, act_name, act)
    return isinstance(got, Tensor) and _close(ref, got)


class LayerFFNAdapter(MLPAdapter):
    """Matches transformer layers that hold ``fc1``, ``activation_fn`` and ``fc2`` themselves
    (OPT, BART family, XGLM, BioGPT, Whisper, ...), checked by running the layer (module
    docstring); also the layers it rewired, so swaps chain."""

    name = "layer_ffn"
    width_key_must_match = True

    def matches(self, module: nn.Module) -> bool:
        if _rewired(module):
            return True
        names = _names(module, False)
        if names is None:
            return False
        key = _structure(module, names[1])
        if key not in _VERDICTS:
            if len(_VERDICTS) >= 256:
                _VERDICTS.clear()
            _VERDICTS[key] = _check(module, names)
        return _VERDICTS[key]

    def resembles(self, module: nn.Module) -> bool:
        """A layer holding its own ``fc1``/``activation_fn``/``fc2`` whose rewiring check
        failed is reported as an unrecognised block. It was left alone silently: LED's and
        BigBirdPegasus's encoder layers and FSMT's decoder layers (their forwards need more than
        the hidden states) stayed dense while the rest was swapped (review, session 20)."""
        return _native(module)

    def describe(self, module: nn.Module) -> MLPSpec:
        cls = type(module).__name__
        act_drop = getattr(module, "activation_dropout", 0.0)
        act_drop = float(act_drop) if isinstance(act_drop, int | float) else 0.0
        swapped = _names(module, True)
        if swapped is not None:
            block = getattr(module, swapped[0])
            spec = spec_from_glu_probe(block, f"{cls}.{swapped[0]} (glu_probe)")
            return dataclasses.replace(spec, drop=(spec.drop[0], 0.0))
        names = _names(module, False)
        if names is None:
            raise UnsupportedModelError(f"{cls}: its feed-forward layers are no longer plain")
        fc1, act, fc2 = (getattr(module, n) for n in names)
        assert isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)
        return MLPSpec(
            in_features=fc1.in_features,
            hidden_features=fc1.out_features,
            out_features=fc2.out_features,
            gated=False,
            activation=activation_name(act),  # type: ignore[arg-type]
            num_params=sum(p.numel() for p in (*fc1.parameters(), *fc2.parameters())),
            bias=(fc1.bias is not None, fc2.bias is not None),
            # The layer's activation dropout moves into the block; its output dropout stays in
            # the layer, after the block.
            drop=(act_drop, 0.0),
            kind=f"{cls} ({names[0]}/{names[2]})",
            device=fc1.weight.device,
            dtype=fc1.weight.dtype,
        )

    def install(self, root: nn.Module, path: str, old: nn.Module, new: nn.Module) -> None:
        layer: Any = old  # the layer itself is rewired, not replaced
        names = _names(layer, True) or _names(layer, False)
        assert names is not None
        up, act, down = names
        flags = {n: getattr(layer, n).training for n in (down, act)}
        setattr(layer, up, new)
        setattr(layer, down, nn.Identity().train(flags[down]))
        setattr(layer, act, nn.Identity().train(flags[act]))
        if isinstance(getattr(layer, "activation_dropout", None), int | float):
            layer.activation_dropout = 0.0  # now the block's drop1

    def dropped_modules(self, module: nn.Module) -> list[nn.Module]:
        # install() rewires the layer in place: only the up, activation and down modules go
        # (the layer, its attention and its norms stay, with their hooks: transformers' own
        # output-capturing ones included)
        names = _names(module, True) or _names(module, False)
        if names is None:
            return list(module.modules())
        parts = [getattr(module, n, None) for n in names]
        return [m for part in parts if isinstance(part, nn.Module) for m in part.modules()]

    def source_parameters(self, module: nn.Module) -> list[nn.Parameter]:
        swapped = _names(module, True)
        if swapped is not None:
            return list(getattr(module, swapped[0]).parameters())
        names = _names(module, False)
        assert names is not None
        return [*getattr(module, names[0]).parameters(), *getattr(module, names[2]).parameters()]

    def config_keys(self, model: nn.Module) -> tuple[str | None, str | None]:
        return width_key(model), None
