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
    from training.fixtures import write_png

    rows = pd.read_csv(manifest)
    extra = []
    for i in range(18):
        rel = f"images/new_{i}.png"
        write_png(tmp_path / "data" / rel, seed=10_000 + i)
        extra.append({**rows.iloc[i % len(rows)].to_dict(), "path": rel, "patient_id": f"src:new-{i}"})
    pd.concat([rows, pd.DataFrame(extra)]).to_csv(manifest, index=False)
    prov = pd.read_csv(tmp_path / "data" / "provenance.csv")
    extra_prov = pd.DataFrame({"path": [e["path"] for e in extra], "split_group": [e["patient_id"] for e in extra]})
    pd.concat([prov, extra_prov]).to_csv(tmp_path / "data" / "provenance.csv", index=False)
    second = prepare(manifest, split_csv, seed=4, locked=True).set_index("group")["split"]
    assert (second.loc[first.index] == first).all()
    assert set(second.index) - set(first.index)
    assert set(second) <= {"train", "valid", "test"}


def _copy_dataset_regrouped(src, dst) -> None:
    """The same images under new paths, with every patient joined to the next (as `training merge` regroups)."""
    import shutil

    shutil.copytree(src, dst)
    manifest = pd.read_csv(dst / "manifest.csv")
    manifest["path"] = ["renamed/" + p.replace("/", "_") for p in manifest["path"]]
    (dst / "renamed").mkdir()
    for old, new in zip(pd.read_csv(src / "manifest.csv")["path"], manifest["path"], strict=True):
        shutil.move(dst / old, dst / new)
    manifest.to_csv(dst / "manifest.csv", index=False)
    prov = pd.DataFrame({"path": manifest["path"], "split_group": [f"merged-{i // 2}" for i in range(len(manifest))]})
    prov.to_csv(dst / "provenance.csv", index=False)


def test_prepare_locked_to_a_registry_split_keeps_each_image_by_hash(tmp_path) -> None:
    """A new user's `merge` + `prepare` (new paths, regrouped near-duplicates) cannot move a trained image to test."""
    from training.dataset import read_lock, write_lock
    from training.fixtures import make_dataset

    manifest = make_dataset(tmp_path / "data", patients_per_label=10)
    shipped = prepare(manifest, tmp_path / "shipped.csv", seed=0)
    lock_path = tmp_path / "models" / "split.csv"
    write_lock(shipped, lock_path)
    lock = read_lock(lock_path)
    _copy_dataset_regrouped(tmp_path / "data", tmp_path / "merged")

    unlocked = prepare(tmp_path / "merged" / "manifest.csv", tmp_path / "unlocked.csv", seed=0)
    assert (unlocked["sha256"].map(lock) != unlocked["split"]).any()  # without the lock the split moves (the bug)

    relocked = prepare(tmp_path / "merged" / "manifest.csv", tmp_path / "locked.csv", seed=0, lock=lock_path)
    before = relocked["sha256"].map(lock)
    trained = set(relocked.loc[before.isin(["train", "valid"]), "sha256"])
    assert not trained & set(relocked.loc[relocked["split"] == "test", "sha256"])  # no trained image in test
    assert (relocked.groupby("group")["split"].nunique() == 1).all()  # groups still never cross splits
    kept = (relocked["split"] == before).mean()
    assert kept > 0.6  # most images keep their split; the rest moved to a more restrictive one
    moved = relocked[relocked["split"] != before]
    order = {"train": 0, "valid": 1, "test": 2}
    assert all(order[a] < order[b] for a, b in zip(moved["split"], before[moved.index], strict=True))
    card = json.loads((tmp_path / "locked.card.json").read_text())
    assert card["info"]["locked_images"] == len(relocked) and card["info"]["new_images"] == 0


def test_prepare_assigns_only_new_images_when_locked(tmp_path) -> None:
    from training.dataset import write_lock
    from training.fixtures import make_dataset

    first = prepare(make_dataset(tmp_path / "data", patients_per_label=6), tmp_path / "a.csv", seed=0)
    write_lock(first, tmp_path / "lock.csv")
    bigger = prepare(make_dataset(tmp_path / "data", patients_per_label=12), tmp_path / "b.csv", seed=5,
                     lock=tmp_path / "lock.csv")  # fmt: skip
    old = bigger["sha256"].isin(set(first["sha256"]))
    assert (bigger.loc[old].set_index("sha256")["split"] == first.set_index("sha256")["split"]).all()
    assert (~old).sum() == len(bigger) - len(first)
    with pytest.raises(FileNotFoundError, match="locked split"):
        prepare(tmp_path / "data" / "manifest.csv", tmp_path / "c.csv", lock=tmp_path / "missing.csv")


def test_evaluating_a_model_on_its_own_training_images_fails_clearly(tmp_path, tiny_registry) -> None:
    import shutil

    from training.dataset import SplitLeakError
    from training.evaluate import evaluate
    from training.fixtures import make_dataset

    split_csv = tmp_path / "split.csv"
    prepare(make_dataset(tmp_path / "data", patients_per_label=6), split_csv, seed=0)
    version = tiny_registry.ensemble("test").members[0]
    shutil.copyfile(split_csv, tiny_registry.version_dir(version) / "split.csv")  # "trained" on this split
    evaluate(tiny_registry.root, [version], split_csv, split="test", n_boot=0)  # unseen test images: fine
    # The same training images under another path and another split label: caught by hash, not by path.
    _copy_dataset_regrouped(tmp_path / "data", tmp_path / "copy")
    relabelled = prepare(tmp_path / "copy" / "manifest.csv", tmp_path / "bad.csv", seed=1)
    relabelled.loc[:, "split"] = "test"
    out = relabelled.drop(columns=["abs_path"]).copy()
    out["path"] = [str(p) for p in relabelled["abs_path"]]
    out.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(
        SplitLeakError, match=r"train/valid split of model mobilenetv2_100-test \(matched by image hash\)"
    ):
        evaluate(tiny_registry.root, [version], tmp_path / "bad.csv", split="test", n_boot=0)


def test_fit_refuses_a_split_that_loosens_the_registry_lock(tmp_path) -> None:
    from training.dataset import check_against_lock, write_lock
    from training.fixtures import make_dataset

    df = prepare(make_dataset(tmp_path / "data", patients_per_label=6), tmp_path / "a.csv", seed=0)
    write_lock(df, tmp_path / "lock.csv")
    assert check_against_lock(read_split_manifest(tmp_path / "a.csv"), tmp_path / "lock.csv")["locked_images"] == 18
    loose = read_split_manifest(tmp_path / "a.csv")
    loose.loc[loose["split"] == "train", "split"] = "test"  # trained images would become test images
    with pytest.raises(ValueError, match="would leave their locked split"):
        check_against_lock(loose, tmp_path / "lock.csv")
    strict = read_split_manifest(tmp_path / "a.csv")
    strict.loc[strict["split"] == "test", "split"] = "train"  # more restrictive: allowed, counted
    assert check_against_lock(strict, tmp_path / "lock.csv")["moved_to_a_more_restrictive_split"] > 0
