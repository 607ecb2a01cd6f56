"""Every Python snippet in ``README.md`` and ``docs/*.md`` runs as written, and what its comments
claim holds.

A snippet that uses names the page defines in prose (a ``model``, a probe batch ``x``, data
loaders) runs after a small setup that defines them with tiny sizes; training lengths are cut
(``max_steps=2000`` -> a few steps) and runs write into a temporary folder. Every snippet must be
registered in ``SNIPPETS`` below: a new one fails ``test_every_snippet_is_registered`` until it
gets a setup and a check, so the docs cannot drift from the code unnoticed.

The README's "In your own run" training snippet has its own test (``test_readme.py``); the
second README snippet is checked here against a dense float64 eigendecomposition.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torchmetrics.wrappers

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("docs/*.md"))]


def _blocks(page: str) -> list[str]:
    text = (ROOT / page).read_text(encoding="utf-8")
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def _tb_scalar_tags(folder: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for event_file in folder.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(event_file))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    return tags


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass
class Snippet:
    """How to run one snippet: code before it, text substitutions in it, checks after it."""

    setup: str = ""
    check: Callable[[dict[str, Any], Path], None] | None = None
    replace: dict[str, str] = field(default_factory=dict)
    skip: str | None = None  # a reason, for a snippet that cannot run offline


# -- setups ------------------------------------------------------------------------------------

_TINY_VIT = """
from timm.models.vision_transformer import VisionTransformer
torch.manual_seed(0)
model = VisionTransformer(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=32,
                          depth=2, num_heads=4)
n_before = sum(p.numel() for p in model.parameters())
"""

_MY_FFN = """
from torch import nn
class MyFFN(nn.Module):
    def __init__(self, d=16, h=64):
        super().__init__()
        self.w_in, self.w_out = nn.Linear(d, h), nn.Linear(h, d)
    def forward(self, x):
        return self.w_out(torch.relu(self.w_in(x)))
"""

_CONVERT = """
import timm.layers
import transformers
from torch import nn
from glu_probe.modules import GLU, SwiGLU
torch.manual_seed(0)
cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=88, num_hidden_layers=1,
                               num_attention_heads=4)
llama_mlp = transformers.models.llama.modeling_llama.LlamaMLP(cfg)
block = SwiGLU(32, 88, bias=False)
model = nn.Module()
model.layers = nn.ModuleList([nn.Module()])
model.layers[0].mlp = SwiGLU(32, 88, bias=False)
glu_mlp = timm.layers.GluMlp(32, 128, act_layer=nn.Sigmoid)
"""

_NTK = """
from torch import nn
from glu_probe.ntk import ntk_spectrum
import transformers
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3))
x = torch.randn(48, 6)  # n = 48 rows: more than a few products span
gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
    n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16))
ids = torch.randint(0, 64, (2, 6))
"""

_PAIR = """
import copy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from glu_probe.modules import MLP, ReGLU, SwiGLU
torch.manual_seed(0)
def _net(block):
    return nn.Sequential(nn.Flatten(), block)
swiglu_net = glu_net = _net(SwiGLU(64, 32, 10))
gelu_net = _net(MLP(64, 48, 10, act_layer=nn.GELU))
relu_net = _net(MLP(64, 48, 10, act_layer=nn.ReLU))
glu_net = _net(ReGLU(64, 32, 10))
_data = TensorDataset(torch.randn(96, 1, 8, 8), torch.randint(0, 10, (96,)))
train_loader = DataLoader(_data, batch_size=16, shuffle=True)
val_loader = DataLoader(_data, batch_size=32)
"""


_LM = """
import transformers
torch.manual_seed(0)
model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
    n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16))
"""


def _check_lm_metrics(ns: dict[str, Any], tmp: Path) -> None:
    """The metrics take the shifted (B, T-1, V) / (B, T-1) tensors: perplexity = exp(token-mean
    CE), accuracy = the token-mean of argmax hits, both over non-ignored labels."""
    metrics = ns["gap"].metrics
    torch.manual_seed(1)
    logits = torch.randn(3, 5, 50)
    labels = torch.randint(0, 50, (3, 5))
    labels[0, 3:] = -100
    for m in metrics.values():
        m.update(logits, labels)
    keep = labels != -100
    ce = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    assert float(metrics["ppl"].compute()) == pytest.approx(float(ce.exp()), rel=1e-5)
    hits = (logits.argmax(-1) == labels)[keep].double().mean()
    assert float(metrics["acc"].compute()) == pytest.approx(float(hits), rel=1e-6)


# -- checks ------------------------------------------------------------------------------------


def _check_sizing(ns: dict[str, Any], tmp: Path) -> None:
    from glu_probe.modules import MLP, SwiGLU

    assert ns["h"] == 2048
    assert ns["dense_hidden_features"](768, ns["h"]) == 3073
    gated, dense = _n_params(SwiGLU(768, 2048)), _n_params(MLP(768, 3072))
    assert abs(gated - dense) / dense < 0.01
    assert type(ns["block"]).__name__ == "GEGLU"


def _check_timm_mlp_layer(ns: dict[str, Any], tmp: Path) -> None:
    from glu_probe.modules import SwiGLU

    mlp = ns["vit"].blocks[0].mlp
    assert isinstance(mlp, SwiGLU)
    assert mlp.hidden_features == 4 * 384  # "gated width 4·384"


def _check_swap_both_ways(ns: dict[str, Any], tmp: Path) -> None:
    from glu_probe.modules import MLP

    model = ns["model"]
    assert all(isinstance(b.mlp, MLP) and not b.mlp.gated for b in model.blocks)
    assert abs(_n_params(model) - ns["n_before"]) / ns["n_before"] < 0.01
    table = str(ns["report"])
    assert "|" in table and "blocks.0.mlp" in table


def _check_hf_swap(ns: dict[str, Any], tmp: Path) -> None:
    from glu_probe.modules import MLP

    llama = ns["llama"]
    mlps = [layer.mlp for layer in llama.model.layers]
    assert all(isinstance(m, MLP) for m in mlps)
    assert llama.config.hidden_act == "gelu" or "gelu" in str(llama.config.hidden_act)


def _check_adapter(ns: dict[str, Any], tmp: Path) -> None:
    from torch import nn

    from glu_probe.modules import SwiGLU
    from glu_probe.swap import registered_adapters, swap_mlp, unregister_adapter

    adapter = next(a for a in registered_adapters() if a.name == "my_ffn")
    try:
        host = nn.Sequential(ns["MyFFN"](), nn.LayerNorm(16))
        n0 = _n_params(host)
        report = swap_mlp(host, "swiglu")
        assert isinstance(host[0], SwiGLU) and len(report.entries) == 1
        assert abs(_n_params(host) - n0) / n0 < 0.01
    finally:
        unregister_adapter(adapter)


def _check_convert(ns: dict[str, Any], tmp: Path) -> None:
    from glu_probe.convert import to_hf_llama
    from glu_probe.modules import GLU

    x = torch.randn(5, 32)
    llama_mlp = ns["llama_mlp"]
    back = to_hf_llama(ns["block"].state_dict())  # the weights moved bit-exactly
    assert all(torch.equal(back[k], v) for k, v in llama_mlp.state_dict().items())
    torch.testing.assert_close(ns["block"](x), llama_mlp(x))
    hf = ns["llama_sd"]
    assert {"layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight"} <= set(hf)
    ours = GLU(32, 64)  # timm's GluMlp(32, 128) halves its hidden width for the gate
    ours.load_state_dict(ns["ours"])
    torch.testing.assert_close(ours(x), ns["glu_mlp"](x))


def _dense_truth(model: torch.nn.Module, inputs: Any, **kw: Any) -> torch.Tensor:
    from glu_probe.ntk import ntk_matrix

    return torch.linalg.eigvalsh(ntk_matrix(model, inputs, dtype=torch.float64, **kw))


def _check_slq(ns: dict[str, Any], tmp: Path) -> None:
    s = ns["s"]
    assert s.effective_rank_method == "slq" and s.effective_rank > 1.0


def _check_ntk_page(ns: dict[str, Any], tmp: Path) -> None:
    ev = _dense_truth(ns["model"], ns["x"])
    top = ns["top"]
    assert abs(top.lambda_max - float(ev[-1])) <= 1e-4 * float(ev[-1])
    # K (output="full") against an explicit float64 Jacobian of every output scalar
    import copy

    from torch.func import functional_call, jacrev

    net = copy.deepcopy(ns["model"]).double()
    params = dict(net.named_parameters())
    jac = jacrev(lambda p: functional_call(net, p, (ns["x"].double(),)))(params)
    J = torch.cat([j.reshape(ns["x"].shape[0] * 3, -1) for j in jac.values()], dim=1)
    K_true = J @ J.T
    K = ns["K"].double()
    assert (K - K_true).abs().max() <= 1e-5 * K_true.abs().max()
    assert ns["KV"].shape == (ns["op"].n, 8) and ns["op"].n == ns["x"].shape[0]
    assert all(isinstance(v, float) for v in ns["logs"].values() if v is not None)


def _check_trained(tags: set[str], expected: tuple[str, ...]) -> None:
    for tag in expected:
        assert tag in tags, (tag, sorted(tags))


def _check_callbacks_page(ns: dict[str, Any], tmp: Path) -> None:
    tags = _tb_scalar_tags(tmp / "runs")
    _check_trained(
        tags,
        (
            "model/train_loss",
            "baseline/train_loss",
            "ntk/model/condition_number",
            "ntk/baseline/condition_number",
            "gap/model/loss",
            "crossing/delta",
        ),
    )
    assert ns["trainer"].global_step == 12


def _check_crossing_page(ns: dict[str, Any], tmp: Path) -> None:
    tags = _tb_scalar_tags(tmp / "runs")
    _check_trained(tags, ("model/train_loss", "gap/model/loss", "gap/model/acc", "crossing/delta"))


def _check_readme_spectrum(ns: dict[str, Any], tmp: Path) -> None:
    spec = ns["spec"]
    assert spec.method == "dense" and spec.converged
    ev = _dense_truth(ns["model"], ns["_x"])
    assert abs(spec.lambda_max - float(ev[-1])) <= 1e-6 * float(ev[-1])
    assert abs(spec.lambda_min - float(ev[0])) <= 1e-6 * float(ev[-1]) + 1e-6 * float(ev[0])


SNIPPETS: dict[tuple[str, int], Snippet] = {
    ("docs/modules.md", 0): Snippet(check=_check_sizing),
    ("docs/modules.md", 1): Snippet(check=_check_timm_mlp_layer),
    ("docs/modules.md", 2): Snippet(setup=_TINY_VIT, check=_check_swap_both_ways),
    ("docs/modules.md", 3): Snippet(
        check=_check_hf_swap,
        replace={"hidden_size=256, intermediate_size=688": "hidden_size=64, intermediate_size=172"},
    ),
    ("docs/modules.md", 4): Snippet(setup=_MY_FFN, check=_check_adapter),
    ("docs/modules.md", 5): Snippet(setup=_CONVERT, check=_check_convert),
    ("docs/ntk.md", 0): Snippet(setup=_NTK, check=_check_slq),
    ("docs/ntk.md", 1): Snippet(setup=_NTK, check=_check_ntk_page),
    ("docs/callbacks.md", 0): Snippet(
        setup=_PAIR,
        check=_check_callbacks_page,
        replace={"max_steps=2000,": "max_steps=12, log_every_n_steps=1,"},
    ),
    ("docs/callbacks.md", 1): Snippet(
        setup=_LM,
        check=_check_lm_metrics,
        skip=None
        if hasattr(torchmetrics.wrappers, "LambdaInputTransformer")
        else "this torchmetrics has no wrappers.LambdaInputTransformer (1.5 and later)",
    ),
    ("docs/crossing.md", 0): Snippet(
        setup=_PAIR,
        check=_check_crossing_page,
        replace={"max_steps=2000,": "max_steps=12, log_every_n_steps=1,"},
    ),
    ("README.md", 0): Snippet(skip="run and checked by test_readme.py"),
    ("README.md", 1): Snippet(
        setup=_TINY_VIT.replace("embed_dim=32", "embed_dim=64")
        + "_torch_randn = torch.randn\n"
        + "def _recording_randn(*a, **k):\n"
        + "    globals()['_x'] = _torch_randn(*a, **k); return globals()['_x']\n"
        + "torch.manual_seed(0)\n",
        replace={"torch.randn(32, 1, 16, 16)": "_recording_randn(32, 1, 16, 16)"},
        check=_check_readme_spectrum,
    ),
}


def test_every_snippet_is_registered():
    found = {(page, i) for page in PAGES for i in range(len(_blocks(page)))}
    assert found == set(SNIPPETS), (
        f"unregistered snippets: {sorted(found - set(SNIPPETS))}; "
        f"registered but gone: {sorted(set(SNIPPETS) - found)}"
    )


@pytest.mark.parametrize("key", sorted(SNIPPETS), ids=lambda k: f"{k[0]}#{k[1]}")
def test_snippet_runs_and_its_claims_hold(key, tmp_path, monkeypatch):
    page, index = key
    snippet = SNIPPETS[key]
    if snippet.skip:
        pytest.skip(snippet.skip)
    code = _blocks(page)[index]
    for old, new in snippet.replace.items():
        assert old in code, f"{page}#{index}: the text to shorten is gone: {old!r}"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    ns: dict[str, Any] = {"torch": torch}
    exec(compile(snippet.setup, f"{page}#{index} setup", "exec"), ns)
    exec(compile(code, f"{page}#{index}", "exec"), ns)
    assert snippet.check is not None, f"{page}#{index} has no check"
    snippet.check(ns, tmp_path)
