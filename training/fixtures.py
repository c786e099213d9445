"""Tiny generated PNG stand-ins and manifests for the training tests and smoke runs (not real radiographs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cxr_triage.labels import CLASS_LABELS


def write_png(path: Path, seed: int, shape: tuple[int, int] = (40, 48), mode: str = "L") -> None:
    """A random-ish grey image (8-bit, or 16-bit for mode 'I;16') with a label-independent gradient."""
    rng = np.random.default_rng(seed)
    h, w = shape
    base = np.linspace(0, 1, w)[None, :] * np.linspace(0.3, 1, h)[:, None]
    img = np.clip(base + 0.3 * rng.random((h, w)), 0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        Image.fromarray((img * 4000).astype(np.uint16)).save(path)
    else:
        Image.fromarray((img * 255).astype(np.uint8), mode="L").save(path)


def make_dataset(root: Path, patients_per_label: int = 6, images_per_patient: int = 1) -> Path:
    """manifest.csv + provenance.csv + PNGs under `root`; returns the manifest path."""
    rows, prov = [], []
    k = 0
    for li, label in enumerate(CLASS_LABELS):
        for p in range(patients_per_label):
            for i in range(images_per_patient):
                rel = f"images/{li}_{p}_{i}.png"
                shape = (40 + 3 * (k % 4), 48 - 2 * (k % 3))
                write_png(root / rel, seed=k, shape=shape, mode="I;16" if k % 7 == 3 else "L")
                pid = f"src:{li}-{p}"
                rows.append(
                    {
                        "path": rel,
                        "label": label,
                        "patient_id": pid,
                        "source": "src",
                        "original_file": rel,
                        "view": "PA",
                        "license": "test",
                    }
                )
                prov.append({"path": rel, "split_group": pid, "age": ""})
                k += 1
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    pd.DataFrame(prov).to_csv(root / "provenance.csv", index=False)
    return root / "manifest.csv"
