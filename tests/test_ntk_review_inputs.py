"""Review findings F7, F8, F12, F13 of the NTK engine, against independent float64 truth.

F7: the structured strategy's check covers every sample (random projection against one VJP).
F8: namedtuple inputs are cast and chunked like tuples.
F12: inputs that disagree on the batch size give a clear ValueError; unbatched constants work.
F13: ``params=`` strings match dotted components (``"h.1"`` is not ``h.10``), regexes are
explicit, and a tied alias selects the underlying parameter.
"""

from __future__ import annotations

import collections
import copy
import math
import re
import warnings
from collections.abc import Mapping
from typing import Any

import pytest
import torch
from torch import nn

from glu_probe.ntk import ntk_matrix, ntk_spectrum
from glu_probe.ntk.functional import (
    ProbeFunction,
    ProbeInputError,
    _map_tensors,
    select_parameters,
)
from glu_probe.ntk.structured import structured_ntk

torch.set_num_threads(1)


def truth_K(
    model: nn.Module,
    inputs: Any,
    output: str = "pntk",
    select: Any = None,
) -> torch.Tensor:
    """Independent float64 K = J Jᵀ: jacrev over functional_call of a float64 copy (eval)."""
    m = copy.deepcopy(model).double().eval()

    def cast(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.double() if x.is_floating_point() else x
        if isinstance(x, Mapping):
            return {k: cast(v) for k, v in x.items()}
        return tuple(cast(v) for v in x)

    x = cast(inputs)
    named = {n: p.detach() for n, p in m.named_parameters() if p.requires_grad}
    if select is not None:
        named = {n: p for n, p in named.items() if n in select}

    def f(ps: dict[str, torch.Tensor]) -> torch.Tensor:
        if isinstance(x, Mapping):
            y = torch.func.functional_call(m, ps, args=(), kwargs=x)
        elif isinstance(x, tuple):
            y = torch.func.functional_call(m, ps, x)
        else:
            y = torch.func.functional_call(m, ps, (x,))
        if output == "full":
            return y.reshape(-1)
        return y.reshape(y.shape[0], -1).sum(-1) / math.sqrt(math.prod(y.shape[1:]))

    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        jac = torch.func.jacrev(f)(named)
    J = torch.cat([j.reshape(j.shape[0], -1) for j in jac.values()], dim=1)
    return J @ J.T


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------------------------- F7
class GatedExtraUse(nn.Module):
    """fc.weight is also used outside fc's forward, only on samples whose x[:, 0] > 0."""

    def __init__(self, d: int = 8, m: int = 32) -> None:
        super().__init__()
        self.fc = nn.Linear(d, m)
        self.out = nn.Linear(m, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc(x))
        extra = torch.tanh(x @ self.fc.weight.T).mean(-1, keepdim=True)
        gate = (x[:, :1] > 0).to(x.dtype)
        return self.out(h) + gate * extra


class HalfPrecisionNorm(nn.Module):
    """Like LLaMA's RMSNorm: normalises in float32 whatever the model's dtype."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * h.to(x.dtype)


class TokenNet(nn.Module):
    """Linear layers on T = 3 tokens around a float32 norm (structured Hadamard route)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 24)
        self.norm = HalfPrecisionNorm(24)
        self.fc2 = nn.Linear(24, 24)
        self.head = nn.Linear(24, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(self.norm(torch.tanh(self.fc(x))))
        return self.head(torch.tanh(h).mean(1))


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(8, 48), nn.GELU(), nn.Linear(48, 48), nn.Tanh(), nn.Linear(48, 3)
    )


@pytest.mark.parametrize("rows", [torch.float64, torch.float32])
def test_extra_weight_use_off_sample_0_is_caught(rows):
    torch.manual_seed(0)
    model, x = GatedExtraUse(), torch.randn(24, 8)
    x[0, 0] = -1.0  # sample 0's gate is closed: a sample-0 check cannot see the extra use
    assert bool((x[:, 0] > 0).any())
    probe = ProbeFunction(model, x, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="differs from the plain Jacobian rows"):
        assert structured_ntk(probe, 2**30, rows) is None
    # the default path falls back to the rows and is right
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        K = ntk_matrix(model, x, jacobian_dtype=rows)
    assert rel_err(K, truth_K(model, x)) < (1e-12 if rows == torch.float64 else 1e-5)


CHECKED = {
    "mlp": lambda: (_mlp(), torch.randn(40, 8), "pntk"),
    "mlp-full": lambda: (_mlp(), torch.randn(20, 8), "full"),
    "tokens-float32-norm": lambda: (TokenNet(), torch.randn(16, 3, 6), "pntk"),
}


@pytest.mark.parametrize("name", list(CHECKED))
@pytest.mark.parametrize("rows", [torch.float64, torch.float32])
def test_projection_check_passes_on_correct_models(name, rows):
    torch.manual_seed(1)
    model, x, output = CHECKED[name]()
    probe = ProbeFunction(model, x, output=output, dtype=torch.float64)
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback, no warning
            K = structured_ntk(probe, 2**30, rows, chunk=5)
    finally:
        handle.remove()
    assert K is not None
    assert rel_err(K, truth_K(model, x, output)) < (1e-12 if rows == torch.float64 else 1e-5)
    # cost of the check: one batched forward per chunk of the check (sized by activations: it
    # holds no per-row Jacobians, so never more chunks than the pass), besides the two
    # one-sample traces (layers, activation size) and the vmapped pass (under vmap the hook
    # fires once per chunk too)
    chunks = math.ceil(x.shape[0] / 5)
    assert 2 + chunks + 1 <= len(calls) <= 2 + 2 * chunks


def test_projection_check_covers_a_timm_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(2)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=3
    )
    x = torch.randn(6, 3, 8, 8)
    for rows in (torch.float64, torch.float32):
        probe = ProbeFunction(vit, x, dtype=torch.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            K = structured_ntk(probe, 2**30, rows)
        assert K is not None
        assert rel_err(K, truth_K(vit, x)) < (1e-12 if rows == torch.float64 else 1e-5)


# ------------------------------------------------------------------------------------- F8
class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f, self.g = nn.Linear(5, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.g(torch.tanh(self.f(x))) * y


Batch = collections.namedtuple("Batch", "x y")


def test_namedtuple_inputs_are_cast_and_chunked():
    torch.manual_seed(3)
    model, x, y = TwoInputs(), torch.randn(6, 5), torch.randn(6, 1)
    batch = Batch(x, y)
    probe = ProbeFunction(model, batch, dtype=torch.float64)
    assert type(probe.inputs) is Batch and probe.inputs.x.dtype == torch.float64
    part = probe.chunk(2, 4)
    assert type(part) is Batch and part.x.shape[0] == 2 and part.y.shape[0] == 2
    assert _map_tensors(batch, lambda t: t + 1).y.shape == (6, 1)

    ev = torch.linalg.eigvalsh(truth_K(model, (x, y)))
    kappa = float(ev[-1] / ev[0])
    s = ntk_spectrum(model, batch, method="dense")
    assert s.precision == "float64"
    assert s.condition_number == pytest.approx(kappa, rel=1e-10)
    for chunk in (None, 2):
        s = ntk_spectrum(model, batch, method="lanczos", dtype=torch.float64, chunk_size=chunk)
        assert s.converged
        assert s.condition_number == pytest.approx(kappa, rel=1e-6)


# ------------------------------------------------------------------------------------ F12
class Masked(nn.Module):
    """Token model with a dict batch: ids (N, T), a per-sample mask, a shared (1, T) position
    tensor and a (T, T) float mixing mask (T != N)."""

    def __init__(self, vocab: int = 11, d: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Linear(1, d)
        self.fc = nn.Linear(d, 3)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        mix: torch.Tensor,
    ) -> torch.Tensor:
        h = self.emb(input_ids) + self.pos(position_ids.unsqueeze(-1).to(self.pos.weight.dtype))
        h = torch.einsum("ts,bsd->btd", mix, torch.tanh(h))
        h = h * attention_mask.unsqueeze(-1).to(h.dtype)
        return self.fc(h).mean(1)


def _masked_batch(n: int = 4, t: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[1, -2:] = 0
    return {
        "position_ids": torch.arange(t).unsqueeze(0),  # (1, T) first: not the batch
        "input_ids": torch.randint(0, 11, (n, t), generator=g),
        "attention_mask": mask,
        "mix": torch.rand(t, t, generator=g),  # (T, T) constant, T != N
    }


def test_unbatched_constants_are_accepted_and_exact():
    torch.manual_seed(5)
    model, batch = Masked(), _masked_batch()
    probe = ProbeFunction(model, batch, dtype=torch.float64)
    assert probe.batch_size == 4  # from input_ids, not from the (1, T) position tensor
    K = ntk_matrix(model, batch)
    assert K.shape == (4, 4)
    assert rel_err(K, truth_K(model, batch)) < 1e-12
    s = ntk_spectrum(model, batch, method="lanczos", dtype=torch.float64, chunk_size=3)
    ev = torch.linalg.eigvalsh(truth_K(model, batch))
    assert s.lambda_max == pytest.approx(float(ev[-1]), rel=1e-8)


def test_per_sample_dict_keys_of_another_batch_size_raise():
    model, batch = Masked(), _masked_batch()
    bad = dict(batch, attention_mask=batch["attention_mask"][:3])
    for method in ("dense", "lanczos"):
        with pytest.raises(ValueError, match=r"inputs\['attention_mask'\] has shape \(3, 5\)"):
            ntk_spectrum(model, bad, method=method)
    with pytest.raises(ValueError, match=r"batch size is 4 \(the leading dimension of inputs"):
        ProbeFunction(model, bad)


class PairNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 4), nn.Linear(2, 4)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(z)


def test_tuple_inputs_of_another_batch_size_name_the_inputs():
    x, z = torch.randn(4, 5), torch.randn(3, 2)
    for method in ("dense", "lanczos"):
        with pytest.raises(ValueError, match=r"inputs\[1\] \(shape \(3, 2\)\)") as info:
            ntk_spectrum(PairNet(), (x, z), method=method)
        assert "batch size is 4" in str(info.value)
    # still a RuntimeError for callers that retry one in another dtype
    with pytest.raises(ProbeInputError) as info:
        ProbeFunction(PairNet(), (x, z))
    assert isinstance(info.value, RuntimeError)
    # a shared (1, D) input is a broadcast constant, not a mismatch
    K = ntk_matrix(PairNet(), (x, z[:1]))
    assert K.shape == (4, 4)


# ------------------------------------------------------------------------------------ F13
class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.h = nn.ModuleList([nn.Linear(2, 2) for _ in range(12)])
        self.fc2 = nn.Linear(2, 2)
        self.fc21 = nn.Linear(2, 2)


def _blocks(sel: dict[str, nn.Parameter]) -> list[str]:
    return sorted({n.split(".")[1] for n in sel if n.startswith("h.")}, key=int)


def test_string_filters_match_dotted_components():
    m = Blocks()
    assert _blocks(select_parameters(m, "h.1.")) == ["1"]
    assert _blocks(select_parameters(m, "h.1")) == ["1"]
    assert list(select_parameters(m, "fc2")) == ["fc2.weight", "fc2.bias"]
    assert list(select_parameters(m, "h.10.bias")) == ["h.10.bias"]
    # regular expressions: explicit prefix, compiled pattern, or regex metacharacters
    assert _blocks(select_parameters(m, r"re:h\.1")) == ["1", "10", "11"]
    assert _blocks(select_parameters(m, re.compile(r"h\.1\d"))) == ["10", "11"]
    assert list(select_parameters(m, r"^fc2\.")) == ["fc2.weight", "fc2.bias"]
    assert list(select_parameters(m, "re:fc")) == [
        "fc2.weight",
        "fc2.bias",
        "fc21.weight",
        "fc21.bias",
    ]
    with pytest.raises(ValueError, match="whole dotted components"):
        select_parameters(m, "fc")
    seq = nn.Sequential(*[nn.Linear(2, 2) for _ in range(13)])
    assert list(select_parameters(seq, "2.")) == ["2.weight", "2.bias"]


class TiedLM(nn.Module):
    """A GPT-2-like tied read-out: ``head.weight`` is ``emb.weight``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 6)
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 7, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(self.emb(ids)))).mean(1)


def test_tied_alias_selects_the_underlying_parameter():
    torch.manual_seed(6)
    m, ids = TiedLM(), torch.randint(0, 7, (5, 3))
    assert list(select_parameters(m, "head")) == ["emb.weight"]
    assert list(select_parameters(m, ["head.weight"])) == ["emb.weight"]
    assert list(select_parameters(m, lambda n, p: n == "head.weight")) == ["emb.weight"]
    K = ntk_matrix(m, ids, params="head")
    assert rel_err(K, truth_K(m, ids, select={"emb.weight"})) < 1e-12


def test_params_may_be_a_sub_module() -> None:
    """(Review, session 18.) ``params=model[2]`` was taken for a ``(name, p) -> bool`` filter
    and *called* (a Linear then raised a TypeError; a module whose forward takes two arguments
    silently selected every parameter). A sub-module now selects its parameters."""
    from glu_probe.ntk.functional import select_parameters

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    assert list(select_parameters(model, model[2])) == ["2.weight", "2.bias"]
    torch.testing.assert_close(
        ntk_matrix(model, x, params=model[2]), ntk_matrix(model, x, params="2")
    )
    with pytest.raises(ValueError, match="holds none of the model's parameters"):
        ntk_matrix(model, x, params=nn.Linear(3, 5))
    model[2].requires_grad_(False)
    with pytest.raises(ValueError, match="all frozen"):
        ntk_matrix(model, x, params=model[2])


def test_meta_parameters_and_nested_inputs() -> None:
    """(Review, session 18.) A model on the meta device failed with "Tensor.item() cannot be
    called on meta tensors"; inputs nested one level deeper (``{"xs": (a, b)}``) were refused
    as holding "no tensor". The first now says what to do; the second is probed."""
    with pytest.raises(ValueError, match="meta device"):
        ntk_spectrum(nn.Linear(3, 2, device="meta"), torch.randn(4, 3))

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(2, 4)

        def forward(self, xs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            return torch.tanh(self.a(xs[0]) + self.b(xs[1])).sum(-1, keepdim=True)

    torch.manual_seed(0)
    model = Pair().double()
    a, b = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    ps = tuple(p.detach() for p in model.parameters())

    def rows(*theta: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, dict(zip(names, theta, strict=True)), ((a, b),))[
            :, 0
        ]

    J = torch.cat([j.reshape(5, -1) for j in torch.autograd.functional.jacobian(rows, ps)], 1)
    for inputs in ({"xs": (a, b)}, ((a, b),)):
        torch.testing.assert_close(ntk_matrix(model, inputs), J @ J.T, rtol=1e-10, atol=1e-12)


def test_a_tuple_output_of_several_tensors_is_pointed_out() -> None:
    """(Review, session 18.) A model returning ``(aux, logits)`` was probed on ``aux`` (the
    first tensor) without a word; the probe now says which tensor it took."""

    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.aux, self.head = nn.Linear(5, 8), nn.Linear(8, 3), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = torch.tanh(self.body(x))
            return self.aux(h), self.head(h)

    x = torch.randn(6, 5)
    with pytest.warns(
        RuntimeWarning, match=r"\(tuple\) holds 2 tensors.*first \(shape \(6, 3\) for 6 sample"
    ):
        ntk_matrix(TwoHeads(), x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        ntk_matrix(TwoHeads(), x, output=lambda out: out[1].sum(-1))
