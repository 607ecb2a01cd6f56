"""Swap the MLP blocks of timm / Hugging Face / glu-probe models in one call.

Built-in adapters, asked in this order (adapters added with :func:`register_adapter` come
first): Hugging Face BERT layers, GPT-2 MLPs, LLaMA-family MLPs, timm MLPs, glu-probe blocks, and
last any other MLP-named block of ``nn.Linear`` layers whose forward pass is checked to be a dense
or gated MLP (:class:`StructuralMLPAdapter`: HF ViT, CLIP, Phi, Phi-3, GPT-NeoX, GPT-J, ...),
and layers that keep ``fc1``/``activation_fn``/``fc2`` themselves, checked by running the layer
(:class:`LayerFFNAdapter`: OPT, BART family, XGLM, BioGPT, Whisper, ...).
"""

from glu_probe.swap.core import (
    MLPAdapter,
    MLPSpec,
    SwapEntry,
    SwapReport,
    UnsupportedModelError,
    host_init,
    register_adapter,
    registered_adapters,
    swap_mlp,
    unregister_adapter,
)
from glu_probe.swap.glu_probe import GluProbeAdapter
from glu_probe.swap.hf_bert import BertLayerAdapter, ResidualNormMLP
from glu_probe.swap.hf_gpt2 import GPT2MLPAdapter
from glu_probe.swap.hf_llama import LlamaMLPAdapter
from glu_probe.swap.layer_ffn import LayerFFNAdapter
from glu_probe.swap.structural import ResidualAddMLP, StructuralMLPAdapter
from glu_probe.swap.timm import TimmMlpAdapter

__all__ = [
    "BertLayerAdapter",
    "GPT2MLPAdapter",
    "GluProbeAdapter",
    "LayerFFNAdapter",
    "LlamaMLPAdapter",
    "MLPAdapter",
    "MLPSpec",
    "ResidualAddMLP",
    "ResidualNormMLP",
    "StructuralMLPAdapter",
    "SwapEntry",
    "SwapReport",
    "TimmMlpAdapter",
    "UnsupportedModelError",
    "host_init",
    "register_adapter",
    "registered_adapters",
    "swap_mlp",
    "unregister_adapter",
]

for _adapter in (
    BertLayerAdapter(),
    GPT2MLPAdapter(),
    LlamaMLPAdapter(),
    TimmMlpAdapter(),
    GluProbeAdapter(),
    StructuralMLPAdapter(),
    LayerFFNAdapter(),
):
    register_adapter(_adapter, first=False)
del _adapter
