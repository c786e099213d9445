"""The group-level split: no patient or split group crosses splits; deterministic for a seed."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from training.dataset import SplitFractions, assign_splits, prepare, read_manifest, read_split_manifest


def _frame() -> pd.DataFrame:
    rows = []
    for source, n_pat in (("a", 30), ("b", 12)):
        for label in ("COVID-19", "Pneumonia", "No finding"):
            for p in range(n_pat):
                for i in range(1 + p % 3):
                    pid = f"{source}:{label}:{p}"
                    rows.append({"path": f"{pid}/{i}.png", "label": label, "patient_id": pid, "source": source})
    df = pd.DataFrame(rows)
    # Near-duplicate groups joining patients (as provenance.csv's split_group does), across labels too.
    df["group"] = df["patient_id"]
    df.loc[df["patient_id"].isin(["a:COVID-19:1", "a:Pneumonia:2", "b:No finding:3"]), "group"] = "dup-1"
    return df


def test_no_group_or_patient_crosses_splits() -> None:
    df = _frame()
    df["split"] = assign_splits(df, seed=3)
    assert set(df["split"]) == {"train", "valid", "test"}
    assert (df.groupby("group")["split"].nunique() == 1).all()
    assert (df.groupby("patient_id")["split"].nunique() == 1).all()


def test_split_is_deterministic_and_seed_dependent() -> None:
    df = _frame()
    a, b = assign_splits(df, seed=1), assign_splits(df, seed=1)
    assert a.equals(b)
    shuffled = df.sample(frac=1.0, random_state=0)
    assert assign_splits(shuffled, seed=1).sort_index().equals(a)  # row order does not matter
    assert not assign_splits(df, seed=2).equals(a)


def test_split_fractions_per_stratum() -> None:
    df = _frame()
    df["split"] = assign_splits(df, seed=0, fractions=SplitFractions(0.6, 0.2, 0.2))
    groups = df.drop_duplicates("group")
    stratum = groups[(groups["source"] == "a") & (groups["label"] == "No finding")]
    counts = stratum["split"].value_counts()
    assert counts["test"] == 6 and counts["valid"] == 6  # round(0.2 x 30)
    with pytest.raises(ValueError):
        SplitFractions(0.5, 0.2, 0.2)


def test_prepare_writes_split_manifest_and_data_card(tmp_path) -> None:
    from training.fixtures import make_dataset

    manifest = make_dataset(tmp_path / "data", patients_per_label=6, images_per_patient=2)
    prov = pd.read_csv(tmp_path / "data" / "provenance.csv")
    prov.loc[prov["path"].str.startswith("images/0_0_"), "split_group"] = "joined"
    prov.loc[prov["path"].str.startswith("images/1_0_"), "split_group"] = "joined"
    prov.to_csv(tmp_path / "data" / "provenance.csv", index=False)
    merged = read_manifest(manifest)
    assert merged.loc[merged["path"] == "images/1_0_0.png", "group"].item() == "joined"

    out = tmp_path / "out" / "split.csv"
    prepare(manifest, out, seed=0)
    df = read_split_manifest(out)
    assert len(df) == 36
    assert (df.groupby("group")["split"].nunique() == 1).all()
    assert all(__import__("pathlib").Path(p).is_file() for p in df["abs_path"])  # paths relative to out folder
    card = json.loads(out.with_suffix(".card.json").read_text())
    assert sum(r["images"] for r in card["counts"]) == 36
    assert "NOT FOR CLINICAL USE" in out.with_suffix(".card.md").read_text()
    assert len(read_split_manifest(out, "test")) == card["totals"]["test"]["images"]


def test_without_provenance_the_group_is_the_patient(tmp_path) -> None:
    from training.fixtures import make_dataset

    manifest = make_dataset(tmp_path / "data", patients_per_label=2)
    (tmp_path / "data" / "provenance.csv").unlink()
    df = read_manifest(manifest)
    assert (df["group"] == df["patient_id"]).all()
    assert "split_group" not in df.columns


def test_locked_prepare_keeps_every_placed_group_where_it_was(tmp_path) -> None:
    from training.dataset import prepare
    from training.fixtures import make_dataset

    manifest = make_dataset(tmp_path / "data", patients_per_label=8)
    split_csv = tmp_path / "split.csv"
    first = prepare(manifest, split_csv, seed=3).set_index("group")["split"]
    # More data arrives (new patients); a different seed would reshuffle everything if the split were not locked.
    bigger = make_dataset(tmp_path / "data", patients_per_label=14)
    second = prepare(bigger, split_csv, seed=4, locked=True).set_index("group")["split"]
    assert (second.loc[first.index] == first).all()
    assert set(second.index) - set(first.index)
    assert set(second) <= {"train", "valid", "test"}
