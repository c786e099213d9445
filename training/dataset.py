"""Manifest reading, the seeded group-level stratified split, the split manifest and the data card."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
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


SPLIT_COLUMNS = ("path", "label", "patient_id", "source", "group", "split", "sha256")
# The split the promoted model set was trained, validated and tested on; it travels with the registry, and
# `prepare` locks to it by default (so a test image stays a test image, whatever the manifest's grouping).
LOCKED_SPLIT_FILE = "split.csv"
LOCK_COLUMNS = ("sha256", "split", "label", "source", "patient_id", "group", "path")
_RESTRICTIVE = ("train", "valid", "test")  # a group holding images of several locked splits takes the first


class SplitLeakError(ValueError):
    """Images to be evaluated were used to train or select a model (the message names them)."""


def check_against_lock(df: pd.DataFrame, lock_path: Path) -> dict[str, int]:
    """Refuse a split manifest that loosens the registry's lock (ValueError naming an example).

    A locked training image may not become a validation or test image, nor a validation image a test image (a
    model would be selected or tested on what it was trained on). Moves the other way are what `prepare` does to a
    group spanning locked splits, and are counted. Returns {"locked_images", "moved_to_a_more_restrictive_split"}.
    """
    lock = read_lock(lock_path)
    df = add_hashes(df)
    before = df["sha256"].map(lambda h: lock.get(h, "")).astype(str)
    locked = before != ""
    rank = {name: i for i, name in enumerate(_RESTRICTIVE)}
    looser = locked & (df["split"].map(rank) > before.map(lambda s: rank.get(s, 0)))
    if looser.any():
        i = int(np.flatnonzero(looser.to_numpy())[0])
        raise ValueError(
            f"{int(looser.sum())} image(s) of the split manifest would leave their locked split in {lock_path}, e.g. "
            f"{df['path'].iloc[i]} ({before.iloc[i]} -> {df['split'].iloc[i]}). Run `training prepare` (it locks to "
            "the registry's split by default)."
        )
    return {
        "locked_images": int(locked.sum()),
        "moved_to_a_more_restrictive_split": int((locked & ~looser & (df["split"] != before)).sum()),
    }


def add_hashes(df: pd.DataFrame) -> pd.DataFrame:
    """Add (or keep) the `sha256` of each image's bytes: the identity of an image, whatever its path."""
    if "sha256" in df.columns and (df["sha256"].astype(str).str.len() == 64).all():
        return df
    df = df.copy()
    df["sha256"] = [sha256_file(Path(p)) for p in df["abs_path"]]
    return df


def read_lock(path: Path) -> dict[str, str]:
    """sha256 -> split of a locked split file (or of any split manifest with a sha256 column)."""
    lock = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "sha256" not in lock.columns or "split" not in lock.columns:
        raise ValueError(f"{path} has no sha256/split columns: not a locked split (write one with `prepare`)")
    return dict(zip(lock["sha256"], lock["split"], strict=True))


def write_lock(df: pd.DataFrame, path: Path) -> None:
    """Write the locked split (hash, split, label, source, patient, group, manifest-relative path)."""
    out = df.copy()
    if "rel_path" in out.columns:
        out["path"] = out["rel_path"]
    path.parent.mkdir(parents=True, exist_ok=True)
    out[list(LOCK_COLUMNS)].sort_values(["split", "sha256"]).to_csv(path, index=False)


def extend_lock(lock_path: Path, split_records: list[Path]) -> int:
    """Add to the registry's lock the images of `split_records` (members' split.csv) it does not hold yet; images
    it holds keep their split. Returns the number of images added."""
    frames = [pd.read_csv(p, dtype=str, keep_default_na=False) for p in split_records if Path(p).is_file()]
    frames = [f for f in frames if "sha256" in f.columns]
    current = pd.read_csv(lock_path, dtype=str, keep_default_na=False) if Path(lock_path).is_file() else None
    known = set(current["sha256"]) if current is not None else set()
    new = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(LOCK_COLUMNS))
    new = new[~new["sha256"].isin(known)].drop_duplicates("sha256")
    if new.empty:
        return 0
    merged = pd.concat([current, new[list(LOCK_COLUMNS)]] if current is not None else [new[list(LOCK_COLUMNS)]])
    tmp = Path(lock_path).with_suffix(".tmp")
    merged.sort_values(["split", "sha256"]).to_csv(tmp, index=False)
    tmp.replace(lock_path)
    return len(new)


def locked_splits(df: pd.DataFrame, lock: dict[str, str]) -> tuple[pd.Series, dict[str, int]]:
    """Split per row from the lock: a group keeps the split of its locked images; "" for groups with none.

    A group whose images were locked to different splits (the manifest grouped near-duplicates the lock kept apart)
    takes the most restrictive one (train before valid before test): no image a model was trained or selected on
    can land in the test split. Returns the splits and counts for the data card.
    """
    per_image = df["sha256"].map(lambda h: lock.get(h, "")).astype(str)
    by_group: dict[str, str] = {}
    conflicts = 0
    for group, splits in per_image.groupby(df["group"]):
        known = {s for s in splits if s}
        if len(known) > 1:
            conflicts += 1
        by_group[str(group)] = next((s for s in _RESTRICTIVE if s in known), "")
    result = df["group"].map(by_group).fillna("").astype(str).rename("split")
    moved = int(((per_image != "") & (per_image != result)).sum())
    stats = {
        "locked_images": int((per_image != "").sum()),
        "new_images": int((per_image == "").sum()),
        "groups_spanning_locked_splits": conflicts,
        "images_moved_to_a_more_restrictive_split": moved,
    }
    return result, stats


def prepare(
    manifest: Path,
    out_csv: Path,
    *,
    seed: int = 0,
    fractions: SplitFractions | None = None,
    provenance: Path | None = None,
    locked: bool = False,
    lock: Path | None = None,
) -> pd.DataFrame:
    """Read + split `manifest`; write the merged split CSV (paths relative to its folder) and data card.

    `lock` (a registry's `split.csv`, or any split manifest with a sha256 column): images it holds keep their
    split, matched by image hash, not path (`locked_splits`); only groups with no locked image are split, by the
    seeded rule among themselves. With `locked`, an existing `out_csv` is a lock as well (the retraining work
    directory keeps its own split when data is added).
    """
    df = add_hashes(read_manifest(manifest, provenance))
    placed: dict[str, str] = {}
    placed_groups: dict[str, str] = {}
    if lock is not None:
        if not Path(lock).is_file():
            raise FileNotFoundError(f"locked split {lock} not found (pass no lock to split from scratch)")
        placed.update(read_lock(Path(lock)))
    if locked and Path(out_csv).is_file():
        previous = pd.read_csv(out_csv, dtype=str, keep_default_na=False)
        placed_groups = dict(zip(previous["group"], previous["split"], strict=True))
        if "sha256" in previous.columns:
            placed.update({k: v for k, v in zip(previous["sha256"], previous["split"], strict=True) if k not in placed})
    df["split"], lock_stats = locked_splits(df, placed)
    by_group = (df["split"] == "") & df["group"].isin(placed_groups)  # a placed group's new images join it
    df.loc[by_group, "split"] = df.loc[by_group, "group"].map(placed_groups)
    new = df["split"] == ""
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
        "locked_to": str(lock) if lock else ("previous split" if locked else "none"),
        **lock_stats,
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
