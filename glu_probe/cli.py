"""The ``glu-probe`` command line: ``demo``, ``report``, ``theory`` and ``spectrum``.

Run ``glu-probe --help`` or ``glu-probe <command> --help`` for the options.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import _json as strict_json

__all__ = ["build_parser", "main"]

_GLU_VARIANTS = ("glu", "bilinear", "reglu", "geglu", "swiglu")
_DENSE_VARIANTS = ("relu", "gelu", "silu")

_EPILOG = """\
examples:
  glu-probe demo                       # three paired GLU vs non-GLU runs (~1.5-2 min, 2 CPU cores)
  glu-probe demo --quick --out /tmp/r  # the reduced CI size (about 15 s on an idle CPU)
  glu-probe report runs/demo-20260101-120000 --out report.png
  glu-probe theory --d 16 --m 256 --n 512
  glu-probe spectrum --timm vit_tiny_patch16_224 --set img_size=32 --set depth=2 --swap swiglu
  glu-probe spectrum --hf-config gpt2 --set n_layer=2 --set n_embd=64 --set n_head=4 \\
      --set vocab_size=256 --batch-size 2 --seq-len 32
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {value}")
    return value


def _key_value(text: str) -> tuple[str, Any]:
    if "=" not in text or text.startswith("="):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw  # a plain string, e.g. act_layer=gelu
    return key.strip(), value


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``glu-probe`` (all subcommands)."""
    parser = argparse.ArgumentParser(
        prog="glu-probe",
        description=(
            "glu-probe: GLU vs non-GLU MLPs through the lens of the NTK condition number "
            "(after 'The Devil is in the Condition Numbers: Why is GLU Better than non-GLU "
            "Structure?')."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser(
        "demo",
        help="train the three demo pairs and write a summary, a report figure and TensorBoard logs",
        description=(
            "Train three pairs of networks side by side on identical batches (the paper's "
            "two-layer ReLU vs ReGLU in the NTK setting; a tiny timm ViT, GELU MLP vs SwiGLU, on "
            "scikit-learn's digits; a tiny GPT-2, GELU vs SwiGLU, as a byte-level LM on a text "
            "corpus) with the NTK, generalization-gap and loss-crossing monitors. Logs go to "
            "OUT/RUN_NAME/<pair>; at the end a summary table is printed and "
            "OUT/RUN_NAME/report.png "
            "is written. No network access; a GPU is used when present (--device)."
        ),
    )
    demo.add_argument(
        "--out", default="runs", metavar="DIR", help="TensorBoard root (default: runs)"
    )
    demo.add_argument(
        "--run-name", default=None, metavar="NAME", help="run folder name (default: demo-<time>)"
    )
    demo.add_argument(
        "--quick", action="store_true", help="reduced size for CI (about 15 s on an idle CPU)"
    )
    demo.add_argument(
        "--data",
        default=None,
        metavar="PATH",
        help="folder (or one file) of text for the GPT-2 pair (default: the Python standard "
        "library)",
    )
    demo.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="auto (GPU when present), cpu or cuda (default: auto)",
    )
    demo.add_argument(
        "--seed", type=int, default=0, help="seed of data, init and batches (default: 0)"
    )
    demo.add_argument(
        "--pairs",
        nargs="+",
        default=None,
        metavar="PAIR",
        help="run only these pairs: two_layer vit gpt2 (default: all)",
    )
    demo.add_argument(
        "--max-minutes",
        type=_positive_float,
        default=None,
        metavar="MIN",
        help="wall-time cap per pair in minutes (the summary says when a pair was cut short)",
    )
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")

    report = sub.add_parser(
        "report",
        help="summary table and report figure from the TensorBoard event files of a run",
        description=(
            "Read every TensorBoard event directory under RUN_DIR (any run that used the "
            "glu-probe callbacks), print the summary table (condition number at the first and "
            "last probe, loss crossings, final train/val losses and gaps) and write a PNG with "
            "loss curves, condition-number curves and eigenvalue distributions."
        ),
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run folder, e.g. runs/demo-...")
    report.add_argument(
        "--out", default=None, metavar="PNG", help="figure path (default: RUN_DIR/report.png)"
    )
    report.add_argument("--json", action="store_true", help="print the summary rows as JSON too")

    theory = sub.add_parser(
        "theory",
        help=(
            "the paper's two-layer NTK formulas vs the measured NTK for one (d, m, n) setting "
            "or a grid"
        ),
        description=(
            "Draw the paper's two-layer ReLU and ReGLU networks (W, U ~ N(0, 1/d), V ~ N(0, 1/m), "
            "x ~ N(0, I_d)) and compare the extreme eigenvalues and condition number of the exact "
            "empirical NTK with the infinite-width kernel, the paper's approximate kernel (eq. "
            "10/11) and its closed forms. Several values per option give a grid."
        ),
    )
    theory.add_argument("--d", type=_positive_int, nargs="+", required=True, help="input dimension")
    theory.add_argument("--m", type=_positive_int, nargs="+", required=True, help="hidden width")
    theory.add_argument(
        "--n", type=_positive_int, nargs="+", required=True, help="number of samples"
    )
    theory.add_argument(
        "--seed", type=int, default=0, help="seed of inputs and weights (default: 0)"
    )
    theory.add_argument("--markdown", action="store_true", help="print a Markdown table")

    spec = sub.add_parser(
        "spectrum",
        help="NTK condition number of a timm or Hugging Face model at init (from a name/config)",
        description=(
            "Build a model from its architecture only (no pretrained weights, no network): a timm "
            "model by name (timm.create_model(NAME, pretrained=False, **SET)) or a Hugging Face "
            "model from a model type (e.g. gpt2, llama, bert) or a config.json file, with SET "
            "overrides; optionally swap its MLPs (--swap); then compute the extreme eigenvalues "
            "and the condition number of its empirical NTK on a random probe batch."
        ),
    )
    src = spec.add_mutually_exclusive_group(required=True)
    src.add_argument("--timm", metavar="NAME", help="timm model name, e.g. vit_tiny_patch16_224")
    src.add_argument(
        "--hf-config",
        metavar="TYPE_OR_JSON",
        help="Hugging Face model type (gpt2, llama, bert, ...) or path to a config.json",
    )
    spec.add_argument(
        "--set",
        dest="overrides",
        action="append",
        type=_key_value,
        default=[],
        metavar="KEY=VALUE",
        help="model/config override, repeatable (values parsed as JSON, else strings)",
    )
    spec.add_argument(
        "--swap",
        choices=_GLU_VARIANTS + _DENSE_VARIANTS,
        default=None,
        help="swap every MLP block to this variant first (parameter-matched)",
    )
    spec.add_argument(
        "--batch-size", type=_positive_int, default=8, help="probe samples (default 8)"
    )
    spec.add_argument(
        "--seq-len", type=_positive_int, default=16, help="tokens per sample, text models (16)"
    )
    spec.add_argument(
        "--img-size", type=_positive_int, default=None, help="image side, vision models (auto)"
    )
    spec.add_argument(
        "--output", choices=("pntk", "full"), default="pntk", help="NTK rows (default: pntk)"
    )
    spec.add_argument(
        "--method",
        choices=("auto", "dense", "lanczos"),
        default="auto",
        help="exact dense eigh, block Lanczos, or automatic (default)",
    )
    spec.add_argument(
        "--jacobian-dtype",
        choices=("float64", "float32"),
        default="float64",
        help=(
            "precision of the exact path's Jacobian rows: float64 (default, exact) or float32 "
            "(mixed precision: K and eigh stay float64, about half the cost, errors within the "
            "printed rounding bound)"
        ),
    )
    spec.add_argument("--seed", type=int, default=0, help="seed of weights and probe (default 0)")
    spec.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="device (default: auto)"
    )
    spec.add_argument("--json", action="store_true", help="print the result as JSON")

    demo.set_defaults(handler=_cmd_demo, subparser=demo)
    report.set_defaults(handler=_cmd_report, subparser=report)
    theory.set_defaults(handler=_cmd_theory, subparser=theory)
    spec.set_defaults(handler=_cmd_spectrum, subparser=spec)
    return parser


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _cmd_demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from glu_probe.demo import PAIRS, run_demo

    if args.pairs is not None:
        bad = [p for p in args.pairs if p not in PAIRS]
        if bad:
            parser.error(f"unknown pair(s) {bad}; choose from {list(PAIRS)}")
        if len(set(args.pairs)) < len(args.pairs):
            parser.error(f"--pairs lists a pair twice: {args.pairs}")
    if not 0 <= args.seed < 2**32:
        parser.error(f"--seed must lie in [0, 2**32), got {args.seed}")
    if args.device == "cuda" and not _cuda_available():
        parser.error("--device cuda: no CUDA device is available (use --device auto or cpu)")
    if args.run_name is not None and ("/" in args.run_name or args.run_name in ("", ".", "..")):
        parser.error(f"--run-name must be a plain folder name, got {args.run_name!r}")
    if args.data is not None:
        if not Path(args.data).exists():
            parser.error(f"--data {args.data!r} does not exist")
        if args.pairs is None or "gpt2" in args.pairs:
            from glu_probe.demo import check_text_data, default_settings

            try:  # read now, not after the other pairs have trained
                check_text_data(args.data, default_settings(args.quick)["gpt2"])
            except (OSError, ValueError) as err:
                parser.error(f"--data {args.data!r}: {err}")
    out = Path(args.out)
    try:  # (before anything trains: a bad --out once failed after the first pair)
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        parser.error(f"--out {args.out!r} cannot be used as a folder: {err}")
    run_dir = out / args.run_name if args.run_name is not None else None
    if run_dir is not None and run_dir.exists() and not run_dir.is_dir():
        parser.error(f"--run-name {args.run_name!r}: {str(run_dir)!r} is a file, not a folder")
    if run_dir is not None and run_dir.exists() and any(run_dir.iterdir()):
        # TensorBoard would add this run's event files beside the old ones, and the report
        # would mix both runs' series
        parser.error(
            f"run folder {str(run_dir)!r} exists and is not empty: its event "
            "files would mix with this run's; pass another --run-name or remove it"
        )
    run_demo(
        out_dir=args.out,
        run_name=args.run_name,
        quick=args.quick,
        data=args.data,
        device=args.device,
        seed=args.seed,
        max_minutes=args.max_minutes,
        pairs=tuple(args.pairs) if args.pairs else PAIRS,
        progress=not args.no_progress,
    )
    return 0


def _cmd_report(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from glu_probe.report import (
        figure_path,
        load_run,
        make_console,
        plot_report,
        render_table,
        summarize,
    )

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        parser.error(f"RUN_DIR {args.run_dir!r} does not exist or is not a directory")
    try:
        target = figure_path(args.out) if args.out else run_dir / "report.png"
    except ValueError as err:
        parser.error(f"--out {err}")
    try:  # (its folder is created, as the figure writer does)
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        parser.error(f"--out {str(target)!r}: not a writable file path ({err})")
    if target.is_dir() or not os.access(target.parent, os.W_OK):
        parser.error(f"--out {str(target)!r}: not a writable file path")
    try:
        run = load_run(run_dir)
    except FileNotFoundError as err:
        parser.error(str(err))
    rows = summarize(run)
    console = make_console()
    console.print(render_table(rows, title=f"glu-probe report: {run_dir}"))
    png = plot_report(run, target)
    console.print(f"Report figure: {png}")
    if args.json:
        print(strict_json.dumps(rows, indent=2))
    return 0


def _cmd_theory(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from glu_probe.theory import format_theory_table, theory_table

    try:
        rows = theory_table(args.d, args.m, args.n, args.seed)
    except ValueError as err:
        parser.error(str(err))
    print(format_theory_table(rows, markdown=args.markdown))
    return 0


def _resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available")
    return name


def _build_timm(name: str, overrides: dict[str, Any], parser: argparse.ArgumentParser) -> Any:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        parser.error(f"unknown timm model {name!r}{hint}")
    _check_layer_counts(overrides, parser)
    try:
        return timm.create_model(name, pretrained=False, **overrides)
    except Exception as err:  # (AssertionError, ZeroDivisionError, KeyError: review, session 25)
        parser.error(f"timm model {name!r} rejected an override: {type(err).__name__}: {err}")


# ``--set`` keys that count layers/blocks: a count below 1 built a model without blocks, and its
# "NTK spectrum" was reported with exit status 0 (review, session 25)
_LAYER_COUNT_KEYS = frozenset(
    {
        "depth",
        "depths",
        "n_layer",
        "n_layers",
        "num_layers",
        "num_hidden_layers",
        "num_decoder_layers",
        "num_encoder_layers",
        "encoder_layers",
        "decoder_layers",
    }
)


def _check_layer_counts(overrides: dict[str, Any], parser: argparse.ArgumentParser) -> None:
    """Refuse a layer/block count (``depth``, ``n_layer``, ``num_hidden_layers``, ...) below 1."""
    for key, value in overrides.items():
        if key not in _LAYER_COUNT_KEYS:
            continue
        counts = value if isinstance(value, list) else [value]
        if any(isinstance(v, (int, float)) and not isinstance(v, bool) and v < 1 for v in counts):
            parser.error(f"{key}={json.dumps(value)}: a layer count must be >= 1")


def _build_hf(spec: str, overrides: dict[str, Any], parser: argparse.ArgumentParser) -> Any:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    path = Path(spec)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            parser.error(f"config file {spec!r} does not exist")
        try:
            cfg_dict = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:
            parser.error(f"{spec!r} is not valid JSON: {err}")
        if not isinstance(cfg_dict, dict):  # (a list was a TypeError traceback: session 25)
            parser.error(f"{spec!r} is not a JSON object (got {type(cfg_dict).__name__})")
        model_type = cfg_dict.pop("model_type", None)
        if model_type is None:
            parser.error(f"{spec!r} has no 'model_type' entry")
        if not isinstance(model_type, str):
            parser.error(f"{spec!r}: 'model_type' must be a string, got {model_type!r}")
    else:
        model_type, cfg_dict = spec, {}
    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        parser.error(f"unknown Hugging Face model type {model_type!r}{hint}")
    config_class = CONFIG_MAPPING[model_type]
    try:
        default = config_class()
    except Exception:  # a config without defaults: nothing to compare against
        default = None
    if default is not None:
        _check_config_keys(config_class, default, overrides, set(cfg_dict), parser)
    given = set(cfg_dict) | set(overrides)
    cfg_dict.update(overrides)
    _check_layer_counts(cfg_dict, parser)  # (a config file's values too: re-review, session 25)
    if default is not None:
        _drop_special_ids_outside_vocab(default, cfg_dict, given)
    # A value the config or the model rejects (n_head=3 with n_embd=32, n_embd=abc,
    # activation_function=foo) is a usage error, not a traceback (review, session 25); the bare
    # model is built only for a config without a causal-LM head, not on any ValueError (which
    # built the model twice and raised twice).
    try:
        config = AutoConfig.for_model(model_type, **cfg_dict)
        if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
            return AutoModelForCausalLM.from_config(config)
        return AutoModel.from_config(config)
    except Exception as err:
        parser.error(f"--hf-config {spec!r}: {type(err).__name__}: {err}")


_SPECIAL_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def _drop_special_ids_outside_vocab(
    default: Any, cfg_dict: dict[str, Any], given: set[str]
) -> None:
    """A smaller ``vocab_size`` (``--set vocab_size=256`` on gpt2) leaves the model type's
    default special-token ids (50256) outside the vocabulary, which transformers warns about.
    The spectrum probe generates nothing, so such defaults, unless given explicitly, become
    ``None``, with a note on stderr."""
    vocab = cfg_dict.get("vocab_size")
    if not isinstance(vocab, int) or isinstance(vocab, bool):
        return
    for key in _SPECIAL_TOKEN_IDS:
        value = getattr(default, key, None)
        if key in given or not isinstance(value, int) or 0 <= value < vocab:
            continue
        cfg_dict[key] = None
        print(
            f"note: the default {key}={value} lies outside vocab_size={vocab}; set to None "
            f"(pass --set {key}=N to keep one)",
            file=sys.stderr,
        )


# Keyword arguments every Hugging Face config accepts that are not attributes of a default config.
_HF_CONFIG_KWARGS = frozenset({"attn_implementation"})


def _check_config_keys(
    config_class: Any,
    default: Any,
    overrides: dict[str, Any],
    known: set[str],
    parser: argparse.ArgumentParser,
) -> None:
    """Refuse a ``--set`` key that the model type's config does not have (a typo would be ignored).

    Valid: an attribute of ``default``, the model type's default config (aliases in
    ``attribute_map`` included), a keyword
    of the config class's ``__init__``, a key of the given config.json, or ``attn_implementation``.
    """
    import inspect

    valid = set(default.to_dict()) | set(getattr(default, "attribute_map", {})) | known
    valid |= _HF_CONFIG_KWARGS
    valid |= {
        name
        for name, p in inspect.signature(config_class.__init__).parameters.items()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and name != "self"
    }
    for key, value in overrides.items():
        if key in valid or hasattr(default, key) or _config_uses(config_class, default, key, value):
            continue
        close = difflib.get_close_matches(key, sorted(valid), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        parser.error(
            f"--set {key}: {config_class.__name__} has no attribute {key!r}{hint} "
            "(an unknown key would be silently ignored)"
        )


def _config_uses(config_class: Any, default: Any, key: str, value: Any) -> bool:
    """Whether the config takes ``key`` in some form: building it with ``key=value`` changes its
    ``to_dict()`` (transformers 5 moves ``rope_theta`` into ``rope_parameters``, say)."""
    try:
        changed = config_class(**{key: value}).to_dict()
    except Exception:  # a value the config rejects: let the model build report it
        return True
    base = default.to_dict()
    changed.pop(key, None)  # an unknown key is merely stored as an attribute: that is ignored
    base.pop(key, None)
    return bool(changed != base)


def _hf_tensor_module(hf: Any) -> Any:
    """Wrap a Hugging Face model: ``forward(input_ids)`` -> logits, else the last hidden state."""
    import torch
    from torch import nn

    # (use_cache only where forward names it: DistilBERT's of transformers 4.x refuses it)
    extra = {"use_cache": False} if "use_cache" in inspect.signature(hf.forward).parameters else {}

    class HFTensorOutput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hf = hf

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            out = self.hf(input_ids=input_ids, **extra)
            logits = getattr(out, "logits", None)
            return logits if logits is not None else out.last_hidden_state

    return HFTensorOutput()


def _cmd_spectrum(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from glu_probe._rng import stream_seed
    from glu_probe.ntk import ntk_spectrum

    overrides = dict(args.overrides)
    try:
        device = _resolve_device(args.device)
    except ValueError as err:
        parser.error(str(err))
    if not 0 <= args.seed < 2**32:  # (as demo's: a traceback before; review, session 24)
        parser.error(f"--seed must lie in [0, 2**32), got {args.seed}")
    torch.manual_seed(args.seed)
    if args.timm:
        model = _build_timm(args.timm, overrides, parser)
        name = args.timm
    else:
        model = _build_hf(args.hf_config, overrides, parser)
        name = f"hf:{args.hf_config}"
    n_before = sum(p.numel() for p in model.parameters())
    swap_lines: list[str] = []
    if args.swap:
        from glu_probe.swap import UnsupportedModelError, swap_mlp

        try:
            report = swap_mlp(model, args.swap, match="params", multiple_of=1)
        except UnsupportedModelError as err:
            parser.error(f"cannot swap {name}: {err}")
        text = str(report).splitlines()
        total = next((ln for ln in text if "**total**" in ln), "")
        cells = [c.strip() for c in total.strip("|").split("|")]
        detail = f"params {cells[-3]} -> {cells[-2]} ({cells[-1]})" if len(cells) >= 3 else ""
        swap_lines.append(f"{args.swap} (match=params) {detail}".strip())
    n_params = sum(p.numel() for p in model.parameters())
    # probe inputs: their own stream (seed + 1 was the next seed's model init)
    gen = torch.Generator().manual_seed(stream_seed(args.seed, 4, 0))
    if args.timm:
        _check_timm_img_size(model, args.img_size, parser)
        inputs = _timm_probe(model, args.batch_size, args.img_size, gen)
        net = model
    else:
        vocab = int(getattr(model.config, "vocab_size", 256))
        if vocab < 1:  # (torch.randint raised a RuntimeError: review, session 25)
            parser.error(f"--hf-config {args.hf_config!r}: vocab_size must be >= 1, got {vocab}")
        max_pos = getattr(model.config, "n_positions", None) or getattr(
            model.config, "max_position_embeddings", None
        )
        if max_pos is not None and args.seq_len > int(max_pos):
            parser.error(f"--seq-len {args.seq_len} exceeds the model's {max_pos} positions")
        inputs = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=gen)
        net = _hf_tensor_module(model)
    net = net.to(device)
    inputs = inputs.to(device)
    _check_probe_runs(net, inputs, parser)
    # slq_probes: the effective rank on the iterative path too (an SLQ estimate there)
    result = ntk_spectrum(
        net,
        inputs,
        output=args.output,
        method=args.method,
        slq_probes=4,
        jacobian_dtype=getattr(torch, args.jacobian_dtype),
    )
    info = {
        "model": name,
        "parameters": n_params,
        "parameters_before_swap": n_before,
        "probe_shape": list(inputs.shape),
        "output": args.output,
        "method": result.method,
        "precision": result.precision,
        "n_rows": result.n_rows,
        "lambda_max": result.lambda_max,
        "lambda_min": result.lambda_min,
        "condition_number": result.condition_number,
        "residual_max": result.residual_max,
        "residual_min": result.residual_min,
        "converged": result.converged,
        "numerical_rank": result.numerical_rank,
        # λ_min at the rounding level: κ is infinite and λ_min is noise, not a value
        "lambda_min_resolved": math.isfinite(result.condition_number),
        "lambda_min_upper": result.lambda_min_upper,
        "condition_number_lower": result.condition_number_lower,
        "effective_rank": result.effective_rank,
        "effective_rank_method": result.effective_rank_method,
        "wall_time": result.wall_time,
    }
    if args.json:
        print(strict_json.dumps(info, indent=2))
        return 0
    from rich.table import Table

    from glu_probe.report import make_console

    table = Table(title=f"NTK spectrum at init: {name}", show_header=False)
    for line in swap_lines:
        table.add_row("swap", line)
    table.add_row("parameters", f"{n_params:,}")
    table.add_row("probe", f"{tuple(inputs.shape)} -> {result.n_rows} rows ({args.output})")
    table.add_row("method", f"{result.method}, {result.precision} (converged: {result.converged})")
    bound = "rounding bound" if result.method == "dense" else "Ritz residual + rounding"
    resolved = math.isfinite(result.condition_number)
    for label, value, resid in (
        ("λ_max", result.lambda_max, result.residual_max),
        ("λ_min", result.lambda_min, result.residual_min),
    ):
        note = f"± {resid:.2g} ({bound})"
        if label == "λ_min" and not resolved:
            note = (
                f"numerically zero at {result.precision} (rank {result.numerical_rank} of "
                f"{result.n_rows}): rounding noise, not a value"
                if result.numerical_rank is not None
                else "numerically zero: rounding noise, not a value"
            )
        table.add_row(label, f"{value:.6g}  {note}")
    kappa = (
        f"{result.condition_number:.6g}"
        if resolved
        else f"inf (K is singular at this precision; κ ≥ {result.condition_number_lower:.3g})"
    )
    table.add_row("κ = λ_max/λ_min", kappa)
    table.add_row("effective rank", f"{result.effective_rank:.4g} ({result.effective_rank_method})")
    table.add_row("wall time", f"{result.wall_time:.2f} s on {device}")
    make_console().print(table)
    return 0


def _check_probe_runs(net: Any, inputs: Any, parser: argparse.ArgumentParser) -> None:
    """One eval-mode forward pass of one probe sample: a rejected input is a usage error."""
    import torch

    flags = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        with torch.no_grad():
            net(inputs[:1])
    except (AssertionError, RuntimeError, ValueError, IndexError, TypeError) as err:
        parser.error(
            f"the model rejected the probe batch of shape {tuple(inputs.shape)}: "
            f"{type(err).__name__}: {err}"
        )
    finally:
        for module, flag in flags:
            module.training = flag


def _check_timm_img_size(model: Any, img_size: int | None, parser: argparse.ArgumentParser) -> None:
    """``--img-size`` against a timm patch embedding of fixed input size."""
    pe = getattr(model, "patch_embed", None)
    pe_size = getattr(pe, "img_size", None)
    if img_size is None or pe_size is None:
        return
    if getattr(pe, "dynamic_img_size", False) or not getattr(pe, "strict_img_size", True):
        return
    size = pe_size if isinstance(pe_size, (tuple, list)) else (pe_size, pe_size)
    if tuple(int(v) for v in size) != (img_size, img_size):
        shown = size[0] if size[0] == size[1] else tuple(size)
        parser.error(
            f"--img-size {img_size} does not match the model's img_size {shown}; pass "
            f"--set img_size={img_size} (or --set dynamic_img_size=true)"
        )


def _timm_probe(model: Any, batch: int, img_size: int | None, gen: Any) -> Any:
    import torch

    chans, size = 3, 224
    pe = getattr(model, "patch_embed", None)
    if pe is not None:
        proj = getattr(pe, "proj", None)
        chans = int(getattr(proj, "in_channels", chans))
        pe_size = getattr(pe, "img_size", None)
        if pe_size is not None:
            size = int(pe_size[0] if isinstance(pe_size, (tuple, list)) else pe_size)
    else:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        c, h, _w = cfg.get("input_size", (3, 224, 224))
        chans, size = int(c), int(h)
    size = img_size or size
    return torch.randn(batch, chans, size, size, generator=gen)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``glu-probe`` console script; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # (named by the subcommand's own usage, not the top level's)
        args.subparser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.handler(args, args.subparser))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
