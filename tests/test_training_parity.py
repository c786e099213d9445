"""Training's non-augmented (valid) tensors equal the inference path's `model_input` for the same file."""

from __future__ import annotations

import torch

from cxr_triage.pixels import model_input
from training.dataset import prepare, read_split_manifest
from training.fixtures import make_dataset
from training.train import FitConfig, LoadUnit, make_dataloaders


def test_valid_batches_equal_model_input(tmp_path) -> None:
    manifest = make_dataset(tmp_path / "data", patients_per_label=6)
    split_csv = tmp_path / "split.csv"
    prepare(manifest, split_csv, seed=0)
    df = read_split_manifest(split_csv)
    size = 40
    cfg = FitConfig(size=size, batch_size=4)
    dls = make_dataloaders(df, cfg, augment=True)  # augmentation on: the valid path must not apply it
    valid_rows = df[df["split"] == "valid"].reset_index(drop=True)
    assert len(valid_rows) >= 3
    assert list(dls.valid.items["abs_path"]) == list(valid_rows["abs_path"])
    seen = 0
    for xb, yb in dls.valid:
        for x, y in zip(xb, yb, strict=True):
            path = dls.valid.items["abs_path"].iloc[seen]
            expected = model_input(path, size)
            assert x.shape == (3, size, size)
            assert torch.allclose(torch.as_tensor(x), expected, atol=0, rtol=0), path
            assert dls.vocab[int(y)] == dls.valid.items["label"].iloc[seen]
            seen += 1
    assert seen == len(valid_rows)
    # The same unit images through the train-time batch pipeline are augmented (so the check is not vacuous).
    from fastai.torch_core import TensorCategory, TensorImage, set_seed

    units = TensorImage(torch.stack([LoadUnit(size, cache=False)(p) for p in valid_rows["abs_path"]]))
    labels = TensorCategory(torch.zeros(len(units), dtype=torch.long))
    dls.train.after_batch.split_idx, dls.valid.after_batch.split_idx = 0, 1  # as fastai sets them per pass
    set_seed(0)
    train_x, _ = dls.train.after_batch((units.clone(), labels))
    valid_x, _ = dls.valid.after_batch((units.clone(), labels))
    expected = torch.stack([model_input(p, size) for p in valid_rows["abs_path"]])
    assert torch.allclose(torch.as_tensor(valid_x), expected, atol=0, rtol=0)
    assert not torch.allclose(torch.as_tensor(train_x), expected, atol=1e-3)
