"""Manifest reading, the seeded group-level stratified split, the split manifest and the data card."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from cxr_triage.labels import CLASS_LABELS, DEMO_DISCLAIMER

MANIFEST_COLUMNS = ("path", "label", "patient_id", "source", "original_file", "view", "license")
SPLITS = ("train", "valid", "test")
PROVENANCE_FILE = "provenance.csv"


@dataclass(frozen=True)
class SplitFractions:
    """Fractions of groups per split (per stratum); they must add up to 1."""

    train: float = 0.7
    valid: float = 0.15
    test: float = 0.15

    def __post_init__(self) -> None:
        if min(self.train, self.valid, self.test) < 0 or abs(self.train + self.valid + self.test - 1.0) > 1e-6:
            raise ValueError(f"split fractions must be >= 0 and add up to 1, got {self}")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(manifest: Path, provenance: Path | None = None) -> pd.DataFrame:
    """Read a manifest (and its provenance.csv, if present or given); adds `group` and absolute `abs_path`."""
    manifest = Path(manifest)
    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    missing = [c for c in ("path", "label", "patient_id", "source") if c not in df.columns]
    if missing:
        raise ValueError(f"{manifest}: missing columns {missing}")
    bad = sorted(set(df["label"]) - set(CLASS_LABELS))
    if bad:
        raise ValueError(f"{manifest}: unknown labels {bad}; expected {CLASS_LABELS}")
    if df["path"].duplicated().any():
        raise ValueError(f"{manifest}: duplicate paths")
    prov = provenance if provenance is not None else manifest.parent / PROVENANCE_FILE
    if Path(prov).is_file():
        extra = pd.read_csv(prov, dtype=str, keep_default_na=False)
        extra = extra[[c for c in extra.columns if c == "path" or c not in df.columns]]
        df = df.merge(extra, on="path", how="left", validate="one_to_one")
    if "split_group" in df.columns:
        df["group"] = [g if g else p for g, p in zip(df["split_group"].fillna(""), df["patient_id"], strict=True)]
    else:
        df["group"] = df["patient_id"]
    df["abs_path"] = [str((manifest.parent / p).resolve()) for p in df["path"]]
    return df


def _majority(values: pd.Series) -> str:
    counts = values.value_counts()
    best = counts.max()
    return str(sorted(counts[counts == best].index)[0])


def _order_key(seed: int, group: str) -> str:
    return hashlib.sha256(f"cxr-triage-split|{seed}|{group}".encode()).hexdigest()


def assign_splits(df: pd.DataFrame, *, seed: int = 0, fractions: SplitFractions | None = None) -> pd.Series:
    """Split label per row: groups stratified by (majority source, majority label), never separated.

    Within each stratum the groups are ordered by sha256(seed | group), so the result depends only on the seed
    and the stratum's members, not on row order; round(f x n) groups go to test, then to valid, the rest train.
    """
    fr = fractions or SplitFractions()
    per_group = df.groupby("group").agg(source=("source", _majority), label=("label", _majority))
    assignment: dict[str, str] = {}
    for _, stratum in per_group.groupby(["source", "label"], sort=True):
        groups = sorted(stratum.index, key=lambda g: _order_key(seed, str(g)))
        n = len(groups)
        n_test = round(fr.test * n)
        n_valid = round(fr.valid * n)
        for i, g in enumerate(groups):
            assignment[str(g)] = "test" if i < n_test else ("valid" if i < n_test + n_valid else "train")
    return df["group"].map(assignment).rename("split")


def data_card(df: pd.DataFrame) -> dict[str, Any]:
    """Counts of images and groups per label x source x split (JSON-able)."""
    rows = []
    for (split, source, label), part in df.groupby(["split", "source", "label"], sort=True):
        rows.append(
            {
                "split": split,
                "source": source,
                "label": label,
                "images": len(part),
                "patients": part["patient_id"].nunique(),
                "groups": part["group"].nunique(),
            }
        )
    totals = {
        split: {
            "images": int((df["split"] == split).sum()),
            "patients": int(df.loc[df["split"] == split, "patient_id"].nunique()),
            "groups": int(df.loc[df["split"] == split, "group"].nunique()),
            "per_label": {lab: int(((df["split"] == split) & (df["label"] == lab)).sum()) for lab in CLASS_LABELS},
        }
        for split in SPLITS
    }
    return {"disclaimer": DEMO_DISCLAIMER, "totals": totals, "counts": rows}


def data_card_markdown(card: dict[str, Any], *, title: str = "Data card") -> str:
    """Render `data_card` output as markdown."""
    lines = [f"# {title}", "", f"**{DEMO_DISCLAIMER}**", ""]
    extra = card.get("info", {})
    for key, value in extra.items():
        lines.append(f"- {key}: `{value}`")
    if extra:
        lines.append("")
    lines += ["| split | images | patients | groups | " + " | ".join(CLASS_LABELS) + " |", "|---" * 7 + "|"]
    for split, t in card["totals"].items():
        labs = " | ".join(str(t["per_label"][lab]) for lab in CLASS_LABELS)
        lines.append(f"| {split} | {t['images']} | {t['patients']} | {t['groups']} | {labs} |")
    lines += ["", "| split | source | label | images | patients | groups |", "|---|---|---|---|---|---|"]
    for r in card["counts"]:
        lines.append(
            f"| {r['split']} | {r['source']} | {r['label']} | {r['images']} | {r['patients']} | {r['groups']} |"
        )
    lines += ["", "Groups (provenance `split_group`, else `patient_id`) never cross splits."]
    return "\n".join(lines) + "\n"


SPLIT_COLUMNS = ("path", "label", "patient_id", "source", "group", "split")


def prepare(
    manifest: Path,
    out_csv: Path,
    *,
    seed: int = 0,
    fractions: SplitFractions | None = None,
    provenance: Path | None = None,
    locked: bool = False,
) -> pd.DataFrame:
    """Read + split `manifest`; write the merged split CSV (paths relative to its folder) and data card.

    With `locked`, groups that an existing `out_csv` already placed keep their split (the test split stays the
    same test split when data is added); only new groups are split, by the same seeded rule among themselves.
    """
    df = read_manifest(manifest, provenance)
    placed: dict[str, str] = {}
    if locked and Path(out_csv).is_file():
        previous = pd.read_csv(out_csv, dtype=str, keep_default_na=False)
        placed = dict(zip(previous["group"], previous["split"], strict=True))
    new = ~df["group"].isin(placed)
    df["split"] = df["group"].map(placed).fillna("").astype(str)
    if new.any():
        df.loc[new, "split"] = assign_splits(df[new], seed=seed, fractions=fractions)
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    out = df.copy()
    out["path"] = [os.path.relpath(p, out_csv.parent.resolve()) for p in df["abs_path"]]
    front = [c for c in SPLIT_COLUMNS if c in out.columns]
    rest = [c for c in out.columns if c not in front and c != "abs_path"]
    out[front + rest].to_csv(out_csv, index=False)
    card = data_card(df)
    card["info"] = {
        "source_manifest": str(manifest),
        "source_manifest_sha256": sha256_file(Path(manifest)),
        "split_manifest_sha256": sha256_file(out_csv),
        "seed": seed,
        "fractions": str(fractions or SplitFractions()),
    }
    out_csv.with_suffix(".card.json").write_text(json.dumps(card, indent=2) + "\n")
    out_csv.with_suffix(".card.md").write_text(data_card_markdown(card))
    return df


def read_split_manifest(path: Path, split: str | None = None) -> pd.DataFrame:
    """Read a split manifest written by `prepare` (optionally one split); adds absolute `abs_path`."""
    path = Path(path)
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "split" not in df.columns or "group" not in df.columns:
        raise ValueError(f"{path} is not a split manifest (run `prepare` first)")
    df["abs_path"] = [str((path.parent / p).resolve()) for p in df["path"]]
    if split is not None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        df = df[df["split"] == split].reset_index(drop=True)
    return df
