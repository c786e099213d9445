"""Issue 10, the fault suite's bad-input corpus: every hostile file gets its expected C-STORE status or final
instance status and reason, through the real listener and workers (PostgreSQL, Redis), which stay up; good files
sent between them are triaged as usual, and no (fake) patient name reaches the logs.

The corpus and its expectations come from `python -m bench.faults.corpus` (bench/faults/corpus.py).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.faults import corpus
from db.models import InstanceStatus
from tests.conftest import Service, instance_outcomes, wait_until

pytestmark = pytest.mark.integration

GOOD_EVERY = 10  # a good file after every this many corpus files
STATUS_RE = re.compile(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})")
COMMENT_RE = re.compile(r"\(0000,0902\)\s+LO\s+\[([^\]]*)\]")


@dataclass(frozen=True)
class Sent:
    """What the listener answered: `association` is accepted, context_rejected, rejected or failed."""

    association: str
    status: int | None = None
    comment: str | None = None
    detail: str = ""


def _send_storescu(service: Service, path: Path) -> Sent:
    result = service.storescu(path, extra=("-d",))
    output = result.stdout + result.stderr
    found = STATUS_RE.search(output)
    if found is not None:
        comment = COMMENT_RE.search(output)
        return Sent("accepted", int(found.group(1), 16), comment.group(1) if comment else None)
    if "Association Rejected" in output:
        return Sent("rejected", detail=output[-300:])
    if "No presentation context" in output or "no acceptable presentation context" in output.lower():
        return Sent("context_rejected")
    return Sent("failed", detail=output[-500:])


def _send_pynetdicom(port: int, path: Path, request: dict[str, str], scratch: Path) -> Sent:
    """C-STORE the bytes after the file meta (the whole file when it has none) as they are, with `request`'s SOP
    Class, SOP Instance and transfer syntax (pynetdicom sends a file's data set without parsing it)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    data = path.read_bytes()
    split = corpus.split_file(data)
    payload = data if split is None else split[1]
    wire = scratch / path.name
    meta = corpus.file_meta(request["sop_class_uid"], request["sop_instance_uid"], request["transfer_syntax"])
    wire.write_bytes(meta + payload)
    ae = AE(ae_title="CORPUS")
    ae.add_requested_context(request["sop_class_uid"], request["transfer_syntax"])
    ae.add_requested_context(Verification)  # always accepted: the association stands, our context is judged alone
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRTRIAGE")
    if not assoc.is_established:
        return Sent("rejected" if assoc.is_rejected else "failed")
    try:
        ours = (request["sop_class_uid"], request["transfer_syntax"])
        if not any((cx.abstract_syntax, cx.transfer_syntax[0]) == ours for cx in assoc.accepted_contexts):
            return Sent("context_rejected")
        response: Any = assoc.send_c_store(wire)
        if not response or "Status" not in response:
            return Sent("failed", detail="no response (connection cut or aborted)")
        return Sent("accepted", int(response.Status), response.get("ErrorComment"))
    finally:
        if assoc.is_established:
            assoc.release()


def _check_answer(entry: dict[str, Any], sent: Sent) -> str | None:
    """None when the listener's answer is the expected one, else what differs."""
    if entry["association"] == "context_rejected":
        return None if sent.association == "context_rejected" else f"expected context rejected: {sent}"
    if sent.association != "accepted" or sent.status != entry["status"]:
        return f"expected status {entry['status_hex']}: {sent}"
    if entry["comment"] and entry["comment"] not in (sent.comment or ""):
        return f"expected an Error Comment with {entry['comment']!r}: {sent}"
    return None


def _check_instance(entry: dict[str, Any], row: tuple[str, str | None, int] | None) -> str | None:
    expected = entry["instance"]
    if expected is None:
        return None if row is None else f"no instance expected, found {row}"
    if row is None:
        return "no instance row"
    status, reason, predictions = row
    if status != expected["status"]:
        return f"expected {expected['status']} ({expected['reason']!r}), got {status} ({reason!r})"
    if expected["reason"] and expected["reason"] not in (reason or ""):
        return f"expected a reason with {expected['reason']!r}, got {reason!r}"
    if status == InstanceStatus.DONE and "result objects not built" in (reason or ""):
        return f"done, but without its result objects: {reason!r}"
    if predictions != (1 if status == InstanceStatus.DONE else 0):
        return f"{predictions} predictions"
    return None


def test_every_bad_input_gets_its_expected_outcome_and_the_service_stays_up(
    pg_url, redis_url, tiny_registry, service_factory, tmp_path, monkeypatch
):
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the file's data set bytes as they are
    expected = corpus.load_expected(corpus.generate(tmp_path / "corpus"))
    entries: list[dict[str, Any]] = expected["files"]
    assert len(entries) >= 40
    settings = {k.removeprefix("CXR_").lower(): str(v) for k, v in expected["settings"].items()}
    service = service_factory(database_url=pg_url, broker_url=redis_url, models_dir=tiny_registry.root, **settings)
    listener = service.start_listener()
    workers = [service.start_worker(), service.start_worker()]
    scratch, good_dir = tmp_path / "wire", tmp_path / "good"
    scratch.mkdir()
    good_dir.mkdir()

    answers: dict[str, Sent] = {}
    good: dict[str, str] = {}  # sop uid -> file name
    good_answers: list[tuple[str, Sent]] = []
    for index, entry in enumerate(entries):
        path = tmp_path / "corpus" / entry["file"]
        if entry["sender"] == "storescu":
            answers[entry["file"]] = _send_storescu(service, path)
        else:
            answers[entry["file"]] = _send_pynetdicom(service.port, path, entry["request"], scratch)
        if index % GOOD_EVERY == GOOD_EVERY - 1:
            good_file = good_dir / f"good_{index:03d}.dcm"
            good[corpus.write_good_file(good_file, salt=str(tmp_path))] = good_file.name
            good_answers.append((good_file.name, _send_storescu(service, good_file)))

    # Wait for every instance the listener took (answered Success), expected or not.
    taken = {e["request"]["sop_instance_uid"] for e in entries if answers[e["file"]].status == 0} | set(good)

    def all_terminal() -> bool:
        rows = instance_outcomes(pg_url)
        return all(uid in rows and rows[uid][0] in InstanceStatus.TERMINAL for uid in taken)

    problems: list[str] = []
    try:
        wait_until(all_terminal, 120, "every accepted instance to reach done, failed or skipped", interval=1.0)
    except AssertionError as exc:
        problems.append(str(exc))
    rows = instance_outcomes(pg_url)

    known: list[str] = []
    table = []
    for entry in entries:
        uid, sent = entry["request"]["sop_instance_uid"], answers[entry["file"]]
        row = rows.get(uid)
        found = [p for p in (_check_answer(entry, sent), _check_instance(entry, row)) if p is not None]
        if entry["instance"] is None and row is not None:
            found.append(f"a row for a refused file: {row}")
        status = "context rejected" if sent.association == "context_rejected" else f"0x{sent.status or 0:04X}"
        table.append(f"{entry['file']:48s} {status:16s} {row[0] if row else '-':8s} {(row[1] if row else '') or ''}")
        for problem in found:
            (known if entry["known_issue"] else problems).append(f"{entry['file']}: {problem}")
        if entry["known_issue"] and not found:
            problems.append(f"{entry['file']}: the known issue is gone, remove known_issue in bench/faults/corpus.py")
    for name, sent in good_answers:
        if sent.status != 0:
            problems.append(f"{name} (good): {sent}")
    for uid, name in good.items():
        if rows.get(uid, ("absent",))[0] != InstanceStatus.DONE or rows[uid][2] != 1:
            problems.append(f"{name} (good): {rows.get(uid)}")
    print("\n".join(table))  # the outcome of every file (pytest -s, or shown with a failure)
    assert not problems, "\n".join(problems)

    # The processes are alive, and nothing was written outside spool/<valid UID>/<valid UID>.dcm.
    assert listener.poll() is None, "the listener died"
    assert all(worker.poll() is None for worker in workers), "a worker died"
    spool = Path(service.env["CXR_HOME"]) / "spool"
    uid_re = re.compile(r"^[0-9]+(\.[0-9]+)+$")
    for path in spool.rglob("*"):
        relative = path.relative_to(spool)
        if relative.parts[0] == ".incoming" or path.is_dir():
            continue
        study, name = relative.parts
        assert uid_re.match(study) and name.endswith(".dcm") and uid_re.match(name[:-4]), relative
    assert not list(Path("/tmp").glob("cxr-corpus-escape*"))
    # A good file after all of it.
    final = good_dir / "good_final.dcm"
    final_uid = corpus.write_good_file(final, salt=str(tmp_path))
    assert _send_storescu(service, final).status == 0
    wait_until(
        lambda: instance_outcomes(pg_url).get(final_uid, ("",))[0] == InstanceStatus.DONE, 60, "the last good file"
    )

    # No fake patient name or ID reached the logs or a reason.
    logs = service.log_text()
    reasons = "\n".join(reason or "" for _, reason, _ in instance_outcomes(pg_url).values())
    for entry in entries:
        for identifier in entry["identifiers"]:
            assert identifier not in logs, f"{identifier} of {entry['file']} is in the logs"
            assert identifier.upper() not in reasons.upper(), f"{identifier} of {entry['file']} is in a reason"
    if known:
        pytest.xfail("known issues (see known_issue in bench/faults/corpus.py):\n" + "\n".join(known))


def test_the_generator_writes_what_expected_json_lists(tmp_path: Path) -> None:
    out = tmp_path / "corpus"
    code = subprocess.run(
        [*corpus_command(), "--out", str(out)], capture_output=True, text=True, timeout=120, cwd=corpus.ROOT
    )
    assert code.returncode == 0, code.stderr
    entries = corpus.load_expected(out / "expected.json")["files"]
    assert len(entries) >= 40
    assert sorted(p.name for p in out.glob("*.dcm")) == sorted(e["file"] for e in entries)
    categories = {e["category"] for e in entries}
    for needed in ("truncated", "no pixel data", "wrong SOP class", "deflate bomb", "bad UID", "multi-frame"):
        assert needed in categories
    for entry in entries:
        assert entry["sender"] in ("storescu", "pynetdicom")
        assert (entry["association"] == "context_rejected") == (entry["status"] is None)
        assert (entry["instance"] is not None) == (entry["status"] == 0)
        assert not any(s in entry["description"] for s in entry["identifiers"])


def corpus_command() -> list[str]:
    import sys

    return [sys.executable, "-m", "bench.faults.corpus"]
