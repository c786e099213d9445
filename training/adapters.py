"""Dataset adapters: Cohen's metadata.csv, COVIDx split files, a plain manifest, and hospital DICOMs with labels.

Each adapter returns one manifest frame (columns `MANIFEST_COLUMNS` + `original_finding`, absolute paths) and the
counts of rows it dropped, by reason, so that a data card can say what was left out and why.

Mapping to the three labels (documented in README "Training"):
- COVID-19: a finding that names COVID-19 (Cohen `COVID-19`, `COVID-19, ARDS`, `Pneumonia/Viral/COVID-19`;
  COVIDx `COVID-19` or `positive`).
- Pneumonia (non-COVID, infectious): Cohen findings naming a bacterial, viral (not COVID-19) or fungal pneumonia
  organism, SARS, MERS, or plain `Pneumonia`; COVIDx `pneumonia`.
- No finding: Cohen `No Finding`; COVIDx `normal` (or `negative` in versions without a pneumonia class).
- Dropped: lateral and unknown views, CT, ARDS alone, lipoid/aspiration and other non-infectious findings,
  unlabelled rows (`todo`, empty), missing image files.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pandas as pd
import pydicom

from cxr_triage.labels import CLASS_LABELS, COVID19, NO_FINDING, PNEUMONIA
from training.dataset import MANIFEST_COLUMNS, read_manifest

COLUMNS = (*MANIFEST_COLUMNS, "original_finding")
FRONTAL_VIEWS = frozenset({"PA", "AP", "AP SUPINE", "AP SEMI ERECT", "AP ERECT", "FRONTAL"})
LATERAL_VIEWS = frozenset({"L", "LL", "RL", "LAT", "LATERAL"})
INFECTIOUS_PNEUMONIA = (
    "streptococcus",
    "klebsiella",
    "legionella",
    "e.coli",
    "bacterial",
    "mycoplasma",
    "chlamydophila",
    "influenza",
    "varicella",
    "sars",
    "mers",
    "pneumocystis",
    "fungal",
    "viral",
    "herpes",
    "nocardia",
    "staphylococcus",
    "aspergillosis",
    "tuberculosis",
)
NON_INFECTIOUS = ("lipoid", "aspiration", "eosinophilic", "organizing", "interstitial", "uip", "lip", "dip")


def map_cohen_finding(finding: str) -> str | None:
    """Cohen finding text to a label, or None when the finding is not one of our three classes."""
    text = finding.strip().lower()
    if not text or text == "todo":
        return None
    if "covid-19" in text or "covid19" in text:
        return COVID19
    if text in ("no finding", "no findings"):
        return NO_FINDING
    if any(word in text for word in NON_INFECTIOUS):
        return None
    if any(word in text for word in INFECTIOUS_PNEUMONIA) or text in ("pneumonia", "pneumonia (unspecified)"):
        return PNEUMONIA
    return None


def _frame(rows: list[dict[str, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(COLUMNS)).astype(str)


def from_cohen(metadata_csv: Path, images_dir: Path | None = None) -> tuple[pd.DataFrame, Counter[str]]:
    """Cohen's covid-chestxray-dataset `metadata.csv` (patientid, finding, view, modality, folder, filename)."""
    metadata_csv = Path(metadata_csv)
    meta = pd.read_csv(metadata_csv, dtype=str, keep_default_na=False)
    base = Path(images_dir) if images_dir is not None else metadata_csv.parent
    rows, dropped = [], Counter[str]()
    for rec in meta.to_dict("records"):
        modality = rec.get("modality", "X-ray").strip().lower()
        view = rec.get("view", "").strip().upper()
        label = map_cohen_finding(rec.get("finding", ""))
        folder = rec.get("folder", "images") or "images"
        path = (base / folder / rec["filename"]) if images_dir is None else (base / rec["filename"])
        if modality and modality not in ("x-ray", "xray", "cr", "dx"):
            dropped[f"modality {modality}"] += 1
        elif view in LATERAL_VIEWS:
            dropped["lateral view"] += 1
        elif view not in FRONTAL_VIEWS:
            dropped[f"view {view or 'unknown'}"] += 1
        elif label is None:
            dropped[f"finding {rec.get('finding', '') or 'empty'}"] += 1
        elif not path.is_file():
            dropped["missing image file"] += 1
        else:
            rows.append(
                {
                    "path": str(path.resolve()),
                    "label": label,
                    "patient_id": f"cohen:{rec['patientid']}",
                    "source": "cohen",
                    "original_file": f"{metadata_csv.name}:{rec['filename']}",
                    "view": view,
                    "license": rec.get("license", ""),
                    "original_finding": rec.get("finding", ""),
                }
            )
    return _frame(rows), dropped


# Later COVIDx versions are binary (positive / negative); "negative" then means not COVID-19, taken as No finding.
COVIDX_LABELS = {
    "covid-19": COVID19,
    "positive": COVID19,
    "pneumonia": PNEUMONIA,
    "normal": NO_FINDING,
    "negative": NO_FINDING,
}


def from_covidx(split_file: Path, images_dir: Path) -> tuple[pd.DataFrame, Counter[str]]:
    """A COVIDx split file: one `patientid filename label source` line per image, images under `images_dir`."""
    rows, dropped = [], Counter[str]()
    for line in Path(split_file).read_text().splitlines():
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 4:
            dropped["malformed line"] += 1
            continue
        patient, filename, raw_label, source = parts[0], parts[1], parts[2].lower(), parts[3].lower()
        label = COVIDX_LABELS.get(raw_label)
        path = Path(images_dir) / filename
        if label is None:
            dropped[f"label {raw_label}"] += 1
        elif not path.is_file():
            dropped["missing image file"] += 1
        else:
            rows.append(
                {
                    "path": str(path.resolve()),
                    "label": label,
                    "patient_id": f"covidx-{source}:{patient}",
                    "source": f"covidx-{source}",
                    "original_file": f"{Path(split_file).name}:{filename}",
                    "view": "",
                    "license": "",
                    "original_finding": raw_label,
                }
            )
    return _frame(rows), dropped


def from_manifest(manifest: Path) -> tuple[pd.DataFrame, Counter[str]]:
    """A manifest in the shared format (path,label,patient_id,source,original_file,view,license)."""
    df = read_manifest(Path(manifest))
    lateral = df["view"].str.upper().isin(LATERAL_VIEWS) if "view" in df.columns else pd.Series(False, index=df.index)
    dropped = Counter({"lateral view": int(lateral.sum())}) if lateral.any() else Counter[str]()
    df = df[~lateral]
    out = pd.DataFrame({c: df[c] if c in df.columns else "" for c in COLUMNS if c != "path"})
    out.insert(0, "path", df["abs_path"])
    if "split_group" in df.columns:
        out["split_group"] = df["split_group"]
    return out.reset_index(drop=True).astype(str), dropped


def from_dicom_folder(folder: Path, labels_csv: Path, *, source: str = "hospital") -> tuple[pd.DataFrame, Counter[str]]:
    """Confirmed labels coming back from the hospital: DICOM files + a CSV `sop_instance_uid,label`.

    Patient IDs are not stored as such: the manifest keeps a salted hash, enough to keep a patient's films in one
    split.
    """
    labels = pd.read_csv(labels_csv, dtype=str, keep_default_na=False)
    if not {"sop_instance_uid", "label"} <= set(labels.columns):
        raise ValueError(f"{labels_csv}: needs columns sop_instance_uid,label")
    by_uid = dict(zip(labels["sop_instance_uid"], labels["label"], strict=True))
    rows, dropped = [], Counter[str]()
    for path in sorted(Path(folder).rglob("*.dcm")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:
            dropped["unreadable DICOM"] += 1
            continue
        uid = str(ds.get("SOPInstanceUID", ""))
        label = by_uid.get(uid)
        view = str(ds.get("ViewPosition", "") or "").upper()
        if label is None:
            dropped["no confirmed label"] += 1
        elif label not in CLASS_LABELS:
            dropped[f"label {label}"] += 1
        elif view in LATERAL_VIEWS:
            dropped["lateral view"] += 1
        else:
            patient = hashlib.sha256(f"cxr-triage|{ds.get('PatientID', uid)}".encode()).hexdigest()[:16]
            rows.append(
                {
                    "path": str(path.resolve()),
                    "label": label,
                    "patient_id": f"{source}:{patient}",
                    "source": source,
                    "original_file": f"sop:{uid}",
                    "view": view,
                    "license": "hospital data: internal use",
                    "original_finding": label,
                }
            )
    return _frame(rows), dropped
