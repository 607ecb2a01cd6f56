"""ProbeFunction: row maps, input/output forms, parameter filters, side-effect isolation, errors.

Ground truth is closed form (linear models: the pNTK of f = A x is X Xᵀ, the full NTK is
X Xᵀ ⊗ I_O) or an explicit float64 Jacobian from ``torch.autograd.functional.jacobian``.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from glu_probe.ntk import NTKOperator, ProbeFunction, ntk_matrix, ntk_spectrum
from glu_probe.ntk.functional import pick_output, select_parameters

torch.set_num_threads(1)


def explicit_ntk(model: nn.Module, args: tuple, rows_fn) -> torch.Tensor:
    """Independent truth: float64 reverse-mode Jacobian of rows_fn(model(*args)), then J Jᵀ."""
    m = copy.deepcopy(model).double().eval()
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    ps = tuple(p.detach() for n, p in m.named_parameters() if p.requires_grad)
    args = tuple(a.double() if a.is_floating_point() else a for a in args)

    def f(*theta):
        return rows_fn(torch.func.functional_call(m, dict(zip(names, theta, strict=True)), args))

    J = torch.autograd.functional.jacobian(f, ps)
    J = torch.cat([j.reshape(j.shape[0], -1) for j in J], dim=1)
    return J @ J.T


class Linear(nn.Module):
    def __init__(self, d: int, o: int) -> None:
        super().__init__()
        self.A = nn.Linear(d, o, bias=False)

    def forward(self, x):
        return self.A(x)


def test_pntk_and_full_closed_forms():
    torch.manual_seed(0)
    d, o, n = 5, 3, 7
    model = Linear(d, o)
    x = torch.randn(n, d, dtype=torch.float64)
    gram = x @ x.T
    K_pntk = ntk_matrix(model, x, output="pntk")
    K_full = ntk_matrix(model, x, output="full")
    torch.testing.assert_close(K_pntk, gram, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(K_full, torch.kron(gram, torch.eye(o, dtype=torch.float64)))


def test_sequence_output_gives_one_row_per_token():
    torch.manual_seed(0)
    b, t, d, v = 3, 4, 5, 6
    model = Linear(d, v)
    x = torch.randn(b, t, d, dtype=torch.float64)
    probe = ProbeFunction(model, x, dtype=torch.float64)
    assert probe.n_rows == b * t and probe.rows_per_sample == t
    flat = x.reshape(b * t, d)
    torch.testing.assert_close(ntk_matrix(model, x), flat @ flat.T, rtol=1e-12, atol=1e-12)


class MultiOut(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.kind = kind

    def forward(self, x):
        y = self.lin(x)
        if self.kind == "dict":
            return {"hidden": x * 2.0, "logits": y}
        if self.kind == "tuple":
            return (y, x)
        if self.kind == "nologits":
            return {"aux": y, "other": 3}
        from transformers.modeling_outputs import CausalLMOutput

        return CausalLMOutput(logits=y)


@pytest.mark.parametrize("kind", ["dict", "tuple", "nologits", "modeloutput"])
def test_output_forms_pick_the_logits(kind):
    torch.manual_seed(0)
    model = MultiOut(kind)
    x = torch.randn(6, 4)
    truth = explicit_ntk(model.lin, (x,), lambda y: y.sum(-1) / math.sqrt(3))
    torch.testing.assert_close(ntk_matrix(model, x), truth, rtol=1e-10, atol=1e-12)


def test_pick_output_errors_on_no_tensor():
    with pytest.raises(TypeError, match="cannot find a tensor"):
        pick_output({"a": 1})


class IdsAndFeatures(nn.Module):
    """Token ids + float features, called with a tuple or a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.proj = nn.Linear(4, 2)

    def forward(self, input_ids, scale=None):
        h = self.emb(input_ids).mean(1)
        if scale is not None:
            h = h * scale
        return torch.tanh(self.proj(h))


def test_tuple_and_dict_inputs_with_integer_ids():
    torch.manual_seed(0)
    model = IdsAndFeatures()
    ids = torch.randint(0, 11, (5, 3))
    scale = torch.rand(5, 1) + 0.5
    truth = explicit_ntk(model, (ids, scale), lambda y: y.reshape(-1))
    k_tuple = ntk_matrix(model, (ids, scale), output="full")
    k_dict = ntk_matrix(model, {"input_ids": ids, "scale": scale}, output="full")
    torch.testing.assert_close(k_tuple, truth, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(k_dict, truth, rtol=1e-10, atol=1e-12)


def test_callable_output():
    torch.manual_seed(0)
    model = Linear(4, 3)
    x = torch.randn(5, 4)

    def first_two(y):
        return y[:, :2]

    truth = explicit_ntk(model, (x,), lambda y: y[:, :2].reshape(-1))
    torch.testing.assert_close(ntk_matrix(model, x, output=first_two), truth, rtol=1e-10, atol=0)


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def test_param_filters_select_the_same_subset():
    model = TwoLayer()
    want = ["fc2.weight", "fc2.bias"]
    assert list(select_parameters(model, "fc2")) == want
    assert list(select_parameters(model, r"^fc2\.")) == want
    assert list(select_parameters(model, want)) == want
    assert list(select_parameters(model, lambda n, p: n.startswith("fc2"))) == want
    with pytest.raises(ValueError, match="not found"):
        select_parameters(model, ["fc3.weight"])
    with pytest.raises(ValueError, match="no trainable parameters selected"):
        select_parameters(model, "decoder")


def test_param_filter_ntk_matches_subset_jacobian():
    torch.manual_seed(0)
    model = TwoLayer()
    x = torch.randn(6, 4)
    frozen = copy.deepcopy(model)
    frozen.fc1.requires_grad_(False)
    truth = explicit_ntk(frozen, (x,), lambda y: y.sum(-1) / math.sqrt(2))
    torch.testing.assert_close(ntk_matrix(model, x, params="fc2"), truth, rtol=1e-10, atol=0)
    # frozen parameters (requires_grad=False) do not count either
    torch.testing.assert_close(ntk_matrix(frozen, x), truth, rtol=1e-10, atol=0)


class Stateful(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(self.drop(torch.relu(self.bn(self.fc(x)))))


@pytest.mark.parametrize("method", ["dense", "lanczos"])
def test_model_state_rng_and_grads_untouched(method):
    torch.manual_seed(0)
    model = Stateful()
    x = torch.randn(12, 4)
    model(x).sum().backward()  # .grad populated, BN stats moved once
    model.out.bias.grad = None  # one parameter without .grad
    model.train()
    model.drop.eval()  # mixed flags must come back exactly
    flags = {n: m.training for n, m in model.named_modules()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    state = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    ntk_spectrum(model, x, method=method, max_matvecs=24)
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert torch.equal(torch.get_rng_state(), rng)
    for n, p in model.named_parameters():
        if grads[n] is None:
            assert p.grad is None
        else:
            assert torch.equal(p.grad, grads[n])
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


class OwnTrain(nn.Module):
    """Overrides ``train()`` to switch more than the flags (as frozen-BatchNorm and noise
    injection modules do)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(3, 8), nn.Linear(8, 1)
        self.use_noise = True

    def train(self, mode: bool = True) -> OwnTrain:
        super().train(mode)
        self.use_noise = mode
        return self

    def forward(self, x):
        return self.out(torch.tanh(self.fc(x)))


@pytest.mark.parametrize("method", ["dense", "lanczos"])
def test_a_train_override_is_undone_through_train(method):
    """(Review, session 18.) The probe called ``eval()`` and restored only the ``training``
    attributes: the model came back with ``training=True`` but ``use_noise=False``, a state it
    never had. The probe now switches back through ``train()``."""
    model = OwnTrain().train()
    ntk_spectrum(model, torch.randn(6, 3), method=method, max_matvecs=12)
    assert model.training and model.use_noise
    model.eval()
    ntk_spectrum(model, torch.randn(6, 3), method=method, max_matvecs=12)
    assert not model.training and not model.use_noise


def test_eval_mode_uses_running_statistics():
    torch.manual_seed(0)
    model = Stateful()
    x = torch.randn(8, 4)
    model(x)  # move the running statistics away from (0, 1)
    model.train()
    ref = copy.deepcopy(model).eval()
    truth = explicit_ntk(ref, (x,), lambda y: y.sum(-1) / math.sqrt(2))
    torch.testing.assert_close(ntk_matrix(model, x), truth, rtol=1e-10, atol=1e-14)
    assert model.training


def test_eval_mode_false_uses_batch_statistics():
    torch.manual_seed(0)
    model = Stateful()
    model.drop.p = 0.0
    x = torch.randn(8, 4)
    model.train()
    stats = model.bn.running_mean.clone()
    op = NTKOperator(model, x, dtype=torch.float64, eval_mode=False)
    K = op.matvec(torch.eye(8, dtype=torch.float64))
    # batch statistics couple the samples: the truth is the train-mode Jacobian
    ref = copy.deepcopy(model).double().train()
    names = [n for n, _ in ref.named_parameters()]
    ps = tuple(p.detach() for p in ref.parameters())

    def f(*theta):
        buffers = {n: b.clone() for n, b in ref.named_buffers()}
        state = {**dict(zip(names, theta, strict=True)), **buffers}
        return torch.func.functional_call(ref, state, (x.double(),)).sum(-1) / math.sqrt(2)

    J = torch.cat([j.reshape(8, -1) for j in torch.autograd.functional.jacobian(f, ps)], dim=1)
    torch.testing.assert_close(K, J @ J.T, rtol=1e-9, atol=1e-12)
    assert torch.equal(model.bn.running_mean, stats)


def test_error_empty_batch():
    with pytest.raises(ValueError, match="empty"):
        ProbeFunction(TwoLayer(), torch.randn(0, 4))


def test_error_no_trainable_parameters():
    model = TwoLayer().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        ntk_spectrum(model, torch.randn(4, 4))


class Ignores(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return x[:, :2] * 3.0


def test_error_outputs_independent_of_params():
    with pytest.raises(ValueError, match=r"do not depend on the selected parameters \(K == 0\)"):
        ntk_spectrum(Ignores(), torch.randn(4, 4))


def test_error_numerically_zero_kernel():
    model = TwoLayer()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    model.fc2.bias.requires_grad_(False)  # the bias alone would give K = 1 1ᵀ
    # f = W2 tanh(W1 x + b1) with W1 = b1 = W2 = 0: every derivative vanishes, K == 0
    for method in ("dense", "lanczos"):
        with pytest.raises(ValueError, match=r"identically zero \(K == 0\)"):
            ntk_spectrum(model, torch.randn(5, 4), method=method)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_error_nan_inf_outputs(bad):
    x = torch.randn(4, 4)
    x[2, 1] = bad
    with pytest.raises(ValueError, match="NaN/Inf"), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ntk_spectrum(TwoLayer(), x)
    # no misleading "weight used outside its forward" warning from the structured check first
    assert not [w for w in seen if "structured NTK" in str(w.message)]


def test_error_bad_output_spec():
    with pytest.raises(ValueError, match="output must be"):
        ProbeFunction(TwoLayer(), torch.randn(3, 4), output="logits")


class BatchOnly(nn.Module):
    """Uses its weight only when it sees more than one sample (``single=False``) or only when it
    sees one sample (``single=True``): what one sample alone says about the dependence on the
    parameters is not what the batch says."""

    def __init__(self, single: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.single = single

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        uses = (x.shape[0] == 1) if self.single else (x.shape[0] > 1)
        return self.lin(x) if uses else x[:, :2] * 1.0


def test_dependence_on_parameters_is_decided_by_the_whole_batch():
    x = torch.randn(4, 3)
    probe = ProbeFunction(BatchOnly(), x, output="full")
    assert (probe.n_rows, probe.rows_per_sample) == (8, 2)
    # the batch does not depend on the weight, though one sample alone would: K == 0, refused
    with pytest.raises(ValueError, match=r"do not depend on the selected parameters"):
        ProbeFunction(BatchOnly(single=True), x)
    # BatchNorm in train mode (it cannot run on one sample) is validated on the whole batch
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    with pytest.warns(RuntimeWarning, match="eval_mode=False"):
        probe = ProbeFunction(bn, x, eval_mode=False)
    assert probe.n_rows == 4
    with pytest.raises(ValueError, match=r"do not depend on the selected parameters"):
        ProbeFunction(Ignores(), torch.randn(4, 4))


def test_validation_forward_keeps_no_activations(monkeypatch):
    """The validation forward records whether the rows depend on the parameters but saves
    nothing for backward: every tensor autograd would save goes to the dropping pack hook."""
    from glu_probe.ntk import functional

    dropped = []

    def drop(t):
        dropped.append(tuple(t.shape))

    monkeypatch.setattr(functional, "_drop_saved", drop)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    probe = ProbeFunction(model, torch.randn(6, 3), output="full")
    assert probe.n_rows == 12
    assert (6, 5) in dropped  # tanh's output (its derivative's input) was not kept
    # the probe still differentiates normally afterwards: K is the float64 truth
    x = torch.randn(6, 3)
    K = ntk_matrix(model, x, output="full")
    expected = explicit_ntk(model, (x,), lambda y: y.reshape(-1))
    torch.testing.assert_close(K, expected, rtol=1e-10, atol=1e-12)


class Forces(nn.Module):
    """An energy model whose output is the force −∂E/∂x, differentiated inside the forward pass
    with torch.func (as in machine-learned potentials); torch.func refuses saved-tensor hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.energy = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -torch.vmap(torch.func.grad(lambda xi: self.energy(xi).sum()))(x)


def test_models_that_differentiate_inside_forward_are_validated_and_exact():
    """The validation forward drops saved tensors; a model that differentiates inside its
    forward cannot run so and gets a plain autograd forward. K is the float64 truth."""
    torch.manual_seed(3)
    model, x = Forces(), torch.randn(5, 3)
    probe = ProbeFunction(model, x, output="full")
    assert (probe.n_rows, probe.rows_per_sample) == (15, 3)
    K = ntk_matrix(model, x, output="full")
    expected = explicit_ntk(model, (x,), lambda y: y.reshape(-1))
    torch.testing.assert_close(K, expected, rtol=1e-9, atol=1e-12)
