"""`cxr-triage training export-feedback --out DIR`: the site's confirmed reads as training data.

Writes DIR/dicom/<StudyInstanceUID>/<SOPInstanceUID>.dcm and DIR/labels.csv (sop_instance_uid,label), the input of
the training package's hospital DICOM adapter: `cxr-triage training merge ... --dicom-folder DIR/dicom
--dicom-labels DIR/labels.csv` merges them with the public data, split by (hashed) patient.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import typer

from cxr_triage.durable import write_durably
from cxr_triage.settings import get_settings


def export_feedback(
    out: Path = typer.Option(..., help="Folder to write dicom/ and labels.csv into (created; files are replaced)."),
) -> None:
    """Export the confirmed hospital DICOMs (a radiologist's read finding that is one of the model's classes)."""
    from db.feedback_repo import confirmed_instances
    from db.session import session_scope
    from infra.objectstore import read_object

    settings = get_settings()
    with session_scope(settings.effective_database_url) as session:
        confirmed, left_out = confirmed_instances(session)
    missing = 0
    rows = []
    for item in confirmed:
        try:
            data = read_object(settings, item.ref)
        except FileNotFoundError:
            missing += 1
            continue
        write_durably(out / "dicom" / item.study_instance_uid / f"{item.sop_instance_uid}.dcm", data)
        rows.append({"sop_instance_uid": item.sop_instance_uid, "label": item.finding})
    if missing:
        left_out["spool file missing"] = missing
    out.mkdir(parents=True, exist_ok=True)
    with (out / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["sop_instance_uid", "label"])
        writer.writeheader()
        writer.writerows(rows)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["label"]] = counts.get(row["label"], 0) + 1
    summary = {"instances": len(rows), "by_label": counts, "left_out": left_out,
               "licence": "hospital data: internal use; patient identifiers stay in the DICOM headers"}  # fmt: skip
    (out / "export.json").write_text(json.dumps(summary, indent=2) + "\n")
    typer.echo(f"exported {len(rows)} confirmed instance(s) to {out}: {counts}; left out: {left_out or 'none'}")
    typer.echo(
        f"merge: cxr-triage training merge --dicom-folder {out / 'dicom'} --dicom-labels {out / 'labels.csv'} ..."
    )
