"""PairedModule: identical batches, bit-identical training, one global step per batch."""

from __future__ import annotations

import copy
import functools
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from glu_probe.callbacks.paired import PairedModule

torch.set_num_threads(1)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")


def _data(n: int = 48, d: int = 8, c: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    return TensorDataset(x, y)


def _net(seed: int, dropout: float = 0.0, hidden: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 3))


def _trainer(tmp_path, **kw) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
    )
    defaults.update(kw)
    return pl.Trainer(**defaults)


def _solo(
    net: nn.Module,
    loader: DataLoader,
    steps: int,
    *,
    seed: int,
    lr: float = 1e-2,
    clip: float | None = None,
    sched_step: int | None = None,
) -> nn.Module:
    """Plain torch loop: the ground truth of 'training the network alone'."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, sched_step, 0.5) if sched_step else None
    done = 0
    while done < steps:
        for x, y in loader:
            loss = F.cross_entropy(net(x), y, ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            opt.step()
            if sched is not None:
                sched.step()
            done += 1
            if done == steps:
                break
    return net


@pytest.mark.parametrize("clip,sched_step", [(None, None), (0.05, 2)])
def test_paired_equals_training_each_alone_bit_identical(tmp_path, clip, sched_step):
    loader = DataLoader(_data(), batch_size=8, shuffle=False)
    steps = 9  # more than one epoch (6 batches per epoch)
    model, baseline = _net(1, dropout=0.3), _net(2, hidden=12)
    ref_model = _solo(
        copy.deepcopy(model), loader, steps, seed=123, clip=clip, sched_step=sched_step
    )
    ref_base = _solo(
        copy.deepcopy(baseline), loader, steps, seed=999, clip=clip, sched_step=sched_step
    )
    sched = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=sched_step, gamma=0.5)
    module = PairedModule(
        model,
        baseline,
        optimizer="adamw",
        lr=1e-2,
        gradient_clip_val=clip,
        lr_scheduler=sched if sched_step else None,
    )
    trainer = _trainer(tmp_path, max_steps=steps)
    torch.manual_seed(123)
    trainer.fit(module, train_dataloaders=loader)
    assert trainer.global_step == steps  # one global step per paired update
    for p, q in zip(module.model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(p, q)
    for p, q in zip(module.baseline.parameters(), ref_base.parameters(), strict=True):
        assert torch.equal(p, q)
    # the clipping actually bit (otherwise the clip case would test nothing)
    if clip is not None:
        unclipped = _solo(copy.deepcopy(_net(1, dropout=0.3)), loader, steps, seed=123)
        assert not torch.equal(next(unclipped.parameters()), next(module.model.parameters()))


def test_baseline_stream_is_independent_of_its_partner(tmp_path):
    loader = DataLoader(_data(), batch_size=8, shuffle=True)
    finals = []
    for partner in (_net(1, dropout=0.5), _net(5, dropout=0.1, hidden=32)):
        module = PairedModule(partner, _net(2, dropout=0.5), baseline_seed=7, lr=1e-2)
        torch.manual_seed(0)
        _trainer(tmp_path, max_steps=6).fit(module, train_dataloaders=loader)
        finals.append([p.detach().clone() for p in module.baseline.parameters()])
    for p, q in zip(*finals, strict=True):
        assert torch.equal(p, q)
    # and the baseline's dropout stream differs from the model's: the global stream after the run
    # is what a model-only run leaves behind
    module = PairedModule(_net(1, dropout=0.5), _net(2, dropout=0.5), baseline_seed=7)
    torch.manual_seed(0)
    _trainer(tmp_path, max_steps=3).fit(module, train_dataloaders=loader)
    after_paired = torch.rand(1)
    solo = _SoloModule(_net(1, dropout=0.5))
    torch.manual_seed(0)
    _trainer(tmp_path, max_steps=3).fit(solo, train_dataloaders=loader)
    assert torch.equal(after_paired, torch.rand(1))
    for p, q in zip(module.model.parameters(), solo.net.parameters(), strict=True):
        assert torch.equal(p, q)


def test_an_evaluation_before_fit_does_not_seed_the_baseline_stream(tmp_path):
    """(Review, session 18.) ``trainer.validate(module)`` before ``fit`` started the baseline's
    random stream from the seed active then, and ``fit`` kept it: ``seed_everything`` before
    ``fit`` no longer reproduced a baseline with dropout (max weight difference 0.09). The
    stream now starts with the fit, as documented."""
    loader = DataLoader(_data(), batch_size=8)
    val = DataLoader(_data(), batch_size=8)

    def run(validate_seed: int | None) -> list[torch.Tensor]:
        module = PairedModule(_net(1), _net(2, dropout=0.5), lr=1e-2)
        if validate_seed is not None:
            torch.manual_seed(validate_seed)
            _trainer(tmp_path).validate(module, val, verbose=False)
        pl.seed_everything(42, verbose=False)
        _trainer(tmp_path, max_steps=6).fit(module, train_dataloaders=loader)
        return [p.detach().clone() for p in module.baseline.parameters()]

    plain, after_a, after_b = run(None), run(1234), run(999)
    for p, q, r in zip(plain, after_a, after_b, strict=True):
        assert torch.equal(p, q) and torch.equal(p, r)
    # a second fit of the same module (a new Trainer) continues the stream of the first: it
    # is not re-seeded, which would replay the first fit's dropout masks (second review)
    module = PairedModule(_net(1), _net(2, dropout=0.5), lr=1e-2)
    _trainer(tmp_path, max_steps=2).fit(module, train_dataloaders=loader)
    after_first = module._rng_cpu.clone()
    seen: list[torch.Tensor] = []
    plain_fit_start = PairedModule.on_fit_start

    def spy(self):
        plain_fit_start(self)
        seen.append(self._rng_cpu.clone())

    PairedModule.on_fit_start = spy  # type: ignore[method-assign]
    try:
        _trainer(tmp_path, max_steps=2).fit(module, train_dataloaders=loader)
    finally:
        PairedModule.on_fit_start = plain_fit_start  # type: ignore[method-assign]
    assert torch.equal(seen[0], after_first)


class _SoloModule(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y, ignore_index=-100)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.net.parameters(), lr=1e-3)


def test_logged_names_and_values(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    ds = _data(n=40)
    train = DataLoader(ds, batch_size=8)
    val = DataLoader(_data(n=20, seed=3), batch_size=10)
    module = PairedModule(_net(1), _net(2), model_prefix="glu", baseline_prefix="relu")
    trainer = _trainer(tmp_path, max_epochs=1, logger=CSVLogger(str(tmp_path)), log_every_n_steps=1)
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    cm = trainer.callback_metrics
    assert {"glu/train_loss", "relu/train_loss", "glu/val_loss", "relu/val_loss"} <= set(cm)
    # val loss = batch-size weighted mean of the per-batch mean cross-entropy, recomputed here
    module.eval()
    with torch.no_grad():
        for name, net in (("glu", module.model), ("relu", module.baseline)):
            tot = sum(F.cross_entropy(net(x), y, reduction="sum") for x, y in val)
            assert float(cm[f"{name}/val_loss"]) == pytest.approx(float(tot) / 20, rel=1e-6)
    import csv

    with open(trainer.logger.log_dir + "/metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    train_rows = [r for r in rows if r.get("glu/train_loss")]
    assert [int(r["step"]) for r in train_rows] == list(range(5))


def test_causal_lm_loss_matches_hf_and_trains(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2,
        attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    m, b = transformers.GPT2LMHeadModel(cfg), transformers.GPT2LMHeadModel(cfg)
    module = PairedModule(m, b, causal_lm=True)
    ids = torch.randint(0, 32, (4, 12))
    labels = ids.clone()
    labels[:, :3] = -100  # ignored positions, as HF
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        ours = module.compute_loss(batch, "model")
        hf = m(**batch).loss
    assert float(ours) == pytest.approx(float(hf), rel=1e-6)
    samples = [{k: v[i] for k, v in batch.items()} for i in range(4)]
    data = DataLoader(samples, batch_size=2)  # dict batches through the default collate
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(module, train_dataloaders=data)
    assert trainer.global_step == 2
    assert "model/train_loss" in trainer.callback_metrics


def test_reduce_on_plateau_and_epoch_scheduler(tmp_path):
    train = DataLoader(_data(n=16), batch_size=8)
    val = DataLoader(_data(n=8, seed=4), batch_size=8)
    module = PairedModule(
        _net(1), _net(2), optimizer=torch.optim.SGD, lr=0.1,
        lr_scheduler=functools.partial(
            torch.optim.lr_scheduler.ReduceLROnPlateau, factor=0.5, patience=0, threshold=10.0
        ),
    )  # fmt: skip
    _trainer(tmp_path, max_epochs=3).fit(module, train, val)
    # threshold=10 (relative) makes every epoch "no improvement" (even the first: best*(1-10) is
    # -inf), so with patience=0 the lr halves at each of the 3 epoch ends
    for opt in module.optimizers():
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    module = PairedModule(
        _net(1), _net(2), optimizer=lambda ps: torch.optim.SGD(ps, lr=0.2),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.1),
        lr_scheduler_interval="epoch",
    )  # fmt: skip
    _trainer(tmp_path, max_epochs=2).fit(module, train)
    for opt in module.optimizers():
        assert opt.param_groups[0]["lr"] == pytest.approx(0.2 * 0.1**2)


def test_resume_restores_baseline_stream(tmp_path):
    loader = DataLoader(_data(n=24), batch_size=8)  # 3 batches per epoch

    def run(max_epochs: int, ckpt: str | None = None) -> PairedModule:
        module = PairedModule(_net(1), _net(2, dropout=0.5), baseline_seed=3, lr=1e-2)
        trainer = _trainer(tmp_path, max_epochs=max_epochs)
        torch.manual_seed(0)
        trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt)
        if ckpt is None:
            trainer.save_checkpoint(str(tmp_path / f"e{max_epochs}.ckpt"))
        return module

    full = run(2)
    run(1)
    resumed = run(2, str(tmp_path / "e1.ckpt"))
    for p, q in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("sched", ["step_lr", "plateau"])
def test_epoch_schedulers_resume_from_an_epoch_end_checkpoint(tmp_path, sched):
    """Lightning re-runs on_train_epoch_end after restoring a checkpoint saved there: the restored
    epoch scheduler must not step again (StepLR ended at half the lr) and ReduceLROnPlateau,
    whose metric no checkpoint holds, must not fail. Also: max_steps ending mid-epoch steps no
    scheduler for the unfinished epoch, as Lightning's own update."""
    train = DataLoader(_data(n=24), batch_size=8)  # 3 batches per epoch
    val = DataLoader(_data(n=8, seed=4), batch_size=8)
    factory = (
        functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
        if sched == "step_lr"
        else functools.partial(
            torch.optim.lr_scheduler.ReduceLROnPlateau, factor=0.5, patience=0, threshold=10.0
        )
    )

    def run(steps: int, ckpt: str | None = None) -> tuple[PairedModule, pl.Trainer]:
        module = PairedModule(
            _net(1), _net(2), optimizer=torch.optim.SGD, lr=0.1, lr_scheduler=factory,
            lr_scheduler_interval="epoch",
        )  # fmt: skip
        trainer = _trainer(tmp_path, max_steps=steps)
        torch.manual_seed(0)
        trainer.fit(module, train, val, ckpt_path=ckpt)
        return module, trainer

    full, _ = run(9)  # 3 epochs
    _, trainer = run(6)  # 2 epochs, then a checkpoint
    trainer.save_checkpoint(str(tmp_path / "e2.ckpt"))
    resumed, _ = run(9, str(tmp_path / "e2.ckpt"))
    for opt_full, opt_res in zip(full.optimizers(), resumed.optimizers(), strict=True):
        assert opt_res.param_groups[0]["lr"] == opt_full.param_groups[0]["lr"] == 0.1 * 0.5**3
    for p, q in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    partial, trainer = run(7)  # 2 epochs and one batch of the third: 2 scheduler steps
    for opt in partial.optimizers():
        assert opt.param_groups[0]["lr"] == 0.1 * 0.5**2
    # a checkpoint from the middle of an epoch: that epoch's end still steps once
    trainer.save_checkpoint(str(tmp_path / "mid.ckpt"))
    mid, _ = run(9, str(tmp_path / "mid.ckpt"))
    for opt in mid.optimizers():
        assert opt.param_groups[0]["lr"] == 0.1 * 0.5**3


def test_bad_config():
    net = _net(0)
    with pytest.raises(MisconfigurationException, match="same object"):
        PairedModule(net, net)
    with pytest.raises(MisconfigurationException, match="unknown optimizer"):
        PairedModule(_net(0), _net(1), optimizer="adamx")
    for lr in (-1.0, float("inf"), True):
        with pytest.raises(MisconfigurationException, match="lr must be a finite number > 0"):
            PairedModule(_net(0), _net(1), lr=lr)
    with pytest.raises(MisconfigurationException, match="as lr=, not in optimizer_kwargs"):
        PairedModule(_net(0), _net(1), optimizer_kwargs={"lr": 0.1})
    with pytest.raises(MisconfigurationException, match="gradient_clip_val must be > 0"):
        PairedModule(_net(0), _net(1), gradient_clip_val="1")  # type: ignore[arg-type]
    with pytest.raises(MisconfigurationException, match="must differ"):
        PairedModule(_net(0), _net(1), model_prefix="a", baseline_prefix="a")
    with pytest.raises(MisconfigurationException, match="without '/'"):
        PairedModule(_net(0), _net(1), model_prefix="a/b")
    with pytest.raises(MisconfigurationException, match="gradient_clip_algorithm"):
        PairedModule(_net(0), _net(1), gradient_clip_algorithm="max")
    shared = nn.Linear(8, 3)
    with pytest.raises(MisconfigurationException, match="share 2 parameter"):
        PairedModule(nn.Sequential(shared), nn.Sequential(shared, nn.ReLU()))
    module = PairedModule(_net(0), _net(1))
    with pytest.raises(ValueError, match="no 'labels' entry"):
        module.compute_loss({"x": torch.zeros(2, 8)})
    with pytest.raises(ValueError, match=r"\(inputs, target\)"):
        module.compute_loss((torch.zeros(2, 8), torch.zeros(2), torch.zeros(2)))
    with pytest.raises(ValueError, match="unknown member"):
        module.compute_loss((torch.zeros(2, 8), torch.zeros(2, dtype=torch.long)), "other")


def test_a_missing_stream_is_started_without_resetting_the_restored_one():
    """A checkpoint saved on the CPU holds the baseline's CPU stream and no CUDA one. Resumed on
    a GPU, only the missing CUDA stream is started; the restored CPU stream is kept (both were
    reset until 2026-11-28, review of the CUDA paths). On the CPU: a restored stream survives
    the initialisation, and a missing one is seeded from baseline_seed."""
    module = PairedModule(_net(1), _net(2, dropout=0.5), baseline_seed=3, lr=1e-2)
    restored = torch.Generator().manual_seed(99).get_state()
    module.on_load_checkpoint({"paired_baseline_rng": {"cpu": restored, "cuda": None}})
    module._init_baseline_rng()
    assert torch.equal(module._rng_cpu, restored)
    fresh = PairedModule(_net(1), _net(2, dropout=0.5), baseline_seed=3, lr=1e-2)
    fresh._init_baseline_rng()
    assert torch.equal(fresh._rng_cpu, torch.Generator().manual_seed(3).get_state())


def test_regression_targets_with_the_default_loss_are_refused(tmp_path):
    """(Review, session 18.) The default loss is cross-entropy: float targets of shape (B, 1)
    for a one-output model gave a loss of exactly 0 and trained nothing, silently. They now
    raise an error that names ``loss_fn=``; with ``loss_fn=mse_loss`` the pair trains."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 6, generator=g), torch.randn(16, 1, generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    pair = PairedModule(nn.Linear(6, 1), nn.Linear(6, 1))
    with pytest.raises(ValueError, match="loss_fn="):
        _trainer(tmp_path, max_steps=1).fit(pair, train_dataloaders=loader)
    from glu_probe.callbacks.paired import _default_loss

    with pytest.raises(ValueError, match="1 class"):  # one class on dim 1, integer targets
        _default_loss(torch.randn(4, 1, 3, 3), torch.zeros(4, 3, 3, dtype=torch.long))
    soft = torch.softmax(torch.randn(4, 5, 3, 1), dim=1)  # classes on dim 1, a trailing 1
    assert torch.isfinite(_default_loss(torch.randn(4, 5, 3, 1), soft))
    pair = PairedModule(nn.Linear(6, 1), nn.Linear(6, 1), loss_fn=F.mse_loss, lr=0.1)
    before = F.mse_loss(pair.model(x), y).item()
    _trainer(tmp_path, max_steps=4).fit(pair, train_dataloaders=loader)
    assert F.mse_loss(pair.model(x), y).item() < before


def test_labels_equal_to_input_ids_without_causal_lm_are_pointed_out(tmp_path):
    """(Review, session 18.) A Hugging Face causal LM with ``labels=input_ids`` and the default
    ``causal_lm=False`` trained each position on its own token, without a word."""
    transformers = pytest.importorskip("transformers")
    cfg = dict(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8)
    nets = [transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg)) for _ in range(2)]
    ids = torch.randint(0, 32, (8, 8), generator=torch.Generator().manual_seed(0))
    batches = DataLoader(
        [{"input_ids": ids[i : i + 4], "labels": ids[i : i + 4]} for i in (0, 4)], batch_size=None
    )
    with pytest.warns(UserWarning, match="causal_lm=True"):
        _trainer(tmp_path, max_steps=1).fit(PairedModule(*nets), train_dataloaders=batches)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*causal_lm=True")
        _trainer(tmp_path, max_steps=1).fit(
            PairedModule(*nets, causal_lm=True), train_dataloaders=batches
        )


def _same_outputs(batched: torch.Tensor, whole: torch.Tensor) -> None:
    """Predictions made batch by batch against one call on every sample: equal up to float32
    rounding, since a GEMM's rounding may depend on the number of rows (1 ulp between 10- and
    20-row calls on the session-23 box, where torch.equal failed on unchanged code)."""
    torch.testing.assert_close(batched, whole, rtol=1e-6, atol=1e-6)


def test_predict_and_several_validation_loaders(tmp_path):
    """``trainer.predict`` on ``(x, y)`` batches called ``forward([x, y])`` (a TypeError), and
    Lightning refused several validation loaders for want of ``dataloader_idx`` (review,
    session 20). Predictions are now both members' outputs on the inputs, and each validation
    loader's losses are logged under Lightning's ``/dataloader_idx_k`` suffix, equal to a
    recomputation."""
    module = PairedModule(_net(1), _net(2, dropout=0.5), model_prefix="glu", baseline_prefix="relu")
    val_a, val_b = _data(n=20, seed=3), _data(n=12, seed=4)
    trainer = _trainer(tmp_path, max_epochs=1)
    trainer.fit(
        module,
        DataLoader(_data(n=40), batch_size=8),
        [DataLoader(val_a, batch_size=10), DataLoader(val_b, batch_size=6)],
    )
    cm = trainer.callback_metrics
    module.eval()
    with torch.no_grad():
        for k, ds in enumerate((val_a, val_b)):
            x, y = ds.tensors
            for name, net in (("glu", module.model), ("relu", module.baseline)):
                ref = F.cross_entropy(net(x), y)
                got = cm[f"{name}/val_loss/dataloader_idx_{k}"]
                assert float(got) == pytest.approx(float(ref), rel=1e-6)
    pred_loader = DataLoader(val_a, batch_size=10)
    out = trainer.predict(module, pred_loader)
    x = val_a.tensors[0]
    with torch.no_grad():
        _same_outputs(torch.cat([o["glu"] for o in out]), module.model(x))
        _same_outputs(torch.cat([o["relu"] for o in out]), module.baseline(x))  # (eval)
    only_x = DataLoader(x, batch_size=10)  # batches without targets are the inputs
    out = trainer.predict(module, only_x)
    with torch.no_grad():
        _same_outputs(torch.cat([o["glu"] for o in out]), module.model(x))


def test_predict_on_bare_input_batches_and_integer_seeds_of_any_type(tmp_path):
    """``DataLoader(TensorDataset(x))`` yields ``[x]``, which reached the model as a list; a
    numpy integer seed was refused after the construction checks (re-review, session 20)."""
    np = pytest.importorskip("numpy")
    module = PairedModule(_net(1), _net(2), baseline_seed=np.int64(3))
    assert module.baseline_seed == 3 and type(module.baseline_seed) is int
    x = _data(n=12).tensors[0]
    out = _trainer(tmp_path).predict(module, DataLoader(TensorDataset(x), batch_size=6))
    module.eval()
    with torch.no_grad():
        _same_outputs(torch.cat([o["model"] for o in out]), module.model(x))
