"""`cxr-triage users ...` (accounts and API tokens; each change is audited), `cxr-triage audit export` (the access
audit trail as CSV or JSON) and `cxr-triage api` (the worklist API and page)."""

from __future__ import annotations

import csv
import getpass
import json
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TextIO

import typer
from rich.console import Console
from sqlalchemy import select
from sqlalchemy.orm import Session

from cxr_triage.logs import configure_logging
from cxr_triage.settings import get_settings
from db.audit_models import AuditAction, AuditOutcome
from db.audit_repo import EXPORT_COLUMNS, NewAuditEvent, append, as_record, export_events
from db.session import session_scope
from db.worklist_models import User
from worklist.audit import Auditor
from worklist.auth import AuthError, check_password_policy, create_user, issue_token, set_password

users_app = typer.Typer(help="Worklist users and API tokens.")
audit_app = typer.Typer(help="The access audit trail: who viewed or changed which study, when, from where.")
console = Console()


def _password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    password: str = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    return password


def _url() -> str:
    from db.migrate import upgrade

    url = get_settings().effective_database_url
    get_settings().home.mkdir(parents=True, exist_ok=True)
    upgrade(url)
    return url


def _operator() -> str:
    """Who runs the command, for the audit record: the OS user, else "cli"."""
    try:
        name = getpass.getuser()
    except (OSError, KeyError):
        name = ""
    return name[:64] or "cli"


def _command_event(
    action: AuditAction, via: str, *, target: str | None = None, details: str | None = None
) -> NewAuditEvent:
    return NewAuditEvent(
        username=_operator(),
        action=action,
        client_address=socket.gethostname(),
        via=f"cli {via}",
        outcome=AuditOutcome.SUCCESS,
        object_id=target,
        details=details,
    )


@contextmanager
def _audited_change(action: AuditAction, via: str, target: str, *, details: str | None = None) -> Iterator[Session]:
    """A transaction for a change to user `target` that commits with its audit record, then sends it to syslog."""
    settings = get_settings()
    configure_logging(level=settings.log_level, fmt=settings.log_format, component="cli")  # stderr: stdout is output
    auditor = Auditor(settings)
    try:
        with session_scope(_url()) as session:
            yield session
            row = append(session, _command_event(action, via, target=target, details=details))
        auditor.emit(row)
    finally:
        auditor.close()


PASSWORD_STDIN = typer.Option(False, "--password-stdin", help="Read the password from standard input.")


def _with_password(
    change: Callable[[Session, str, str], object], action: AuditAction, via: str, username: str, password_stdin: bool
) -> None:
    """Read the password, check the policy, apply `change` in one transaction with its audit record; an AuthError
    becomes a usage error (exit status 2, with the reason)."""
    password = _password(password_stdin)
    try:
        check_password_policy(username, password, min_length=get_settings().password_min_length)
        with _audited_change(action, via, username) as session:
            change(session, username, password)
    except AuthError as exc:
        raise typer.BadParameter(str(exc)) from exc


@users_app.command("create")
def users_create(username: str, password_stdin: bool = PASSWORD_STDIN) -> None:
    """Create a user (at least CXR_PASSWORD_MIN_LENGTH characters, not the username; stored as a scrypt hash)."""
    _with_password(create_user, AuditAction.USER_CREATE, "users create", username, password_stdin)
    console.print(f"created user {username}")


@users_app.command("passwd")
def users_passwd(username: str, password_stdin: bool = PASSWORD_STDIN) -> None:
    """Change a user's password (same policy as `create`; signs out their browser sessions)."""
    _with_password(set_password, AuditAction.USER_PASSWORD, "users passwd", username, password_stdin)
    console.print(f"password changed for {username}")


def _user(session: Session, username: str) -> User:
    user = session.scalar(select(User).where(User.username == username))
    if user is None:
        raise typer.BadParameter(f"no user {username!r}")
    return user


@users_app.command("token")
def users_token(username: str, name: str = typer.Option("cli", help="What the token is for.")) -> None:
    """Issue an API token (Authorization: Bearer ...) for the user; it is shown once."""
    with _audited_change(AuditAction.USER_TOKEN, "users token", username, details=f"token name {name}") as session:
        token = issue_token(session, _user(session, username).id, kind="api", name=name)
    print(token)


@users_app.command("list")
def users_list() -> None:
    """Usernames and whether they are active."""
    with session_scope(_url()) as session:
        for user in session.scalars(select(User).order_by(User.username)):
            console.print(f"{user.username}\t{'active' if user.is_active else 'disabled'}")


@users_app.command("disable")
def users_disable(username: str) -> None:
    """Disable a user: their tokens and sessions stop working."""
    with _audited_change(AuditAction.USER_DISABLE, "users disable", username) as session:
        _user(session, username).is_active = False
    console.print(f"disabled {username}")


class ExportFormat(StrEnum):
    CSV = "csv"
    JSON = "json"


def _instant(value: str | None, option: str) -> datetime | None:
    """An ISO 8601 date or date-time; without a zone it is UTC."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise typer.BadParameter(f"{option}: not an ISO 8601 date or date-time: {value!r}") from exc
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _write(out: TextIO, fmt: ExportFormat, records: Iterator[dict[str, object]]) -> int:
    """Write the records as CSV (a header row, then one row each) or a JSON array; returns how many."""
    count = 0
    writer = csv.DictWriter(out, fieldnames=EXPORT_COLUMNS, lineterminator="\n")
    if fmt is ExportFormat.CSV:
        writer.writeheader()
    else:
        out.write("[")
    for record in records:
        if fmt is ExportFormat.CSV:
            writer.writerow(record)
        else:
            out.write(("\n" if count == 0 else ",\n") + json.dumps(record, ensure_ascii=False))
        count += 1
    if fmt is ExportFormat.JSON:
        out.write("\n]\n")
    return count


@audit_app.command("export")
def audit_export(
    since: str | None = typer.Option(None, help="From this instant (ISO 8601; UTC without a zone), inclusive."),
    until: str | None = typer.Option(None, help="Up to this instant, exclusive; default: now."),
    fmt: ExportFormat = typer.Option(ExportFormat.CSV, "--format", help="csv (with a header row) or json (an array)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write to this file; default: standard output."),
) -> None:
    """Every audit event with since <= at < until, in the order recorded; the export itself is recorded too."""
    settings = get_settings()
    configure_logging(level=settings.log_level, fmt=settings.log_format, component="audit")  # stderr: stdout is data
    start, end = _instant(since, "--since"), _instant(until, "--until") or datetime.now(UTC)
    url = _url()
    records = (as_record(row) for row in export_events(url, since=start, until=end))
    if output is None:
        count = _write(sys.stdout, fmt, records)
        sys.stdout.flush()
    else:
        with output.open("w", encoding="utf-8", newline="") as out:
            count = _write(out, fmt, records)
    window = f"since {start.isoformat() if start else '(start)'} until {end.isoformat()}"
    auditor = Auditor(settings)
    try:
        auditor.append(
            _command_event(AuditAction.EXPORT_AUDIT, "audit export", details=f"{count} events {fmt}; {window}")
        )
    finally:
        auditor.close()
    print(f"exported {count} audit events", file=sys.stderr)


def serve() -> None:
    """Run the worklist API and page (uvicorn) on CXR_API_HOST:CXR_API_PORT."""
    import uvicorn

    from db.migrate import upgrade
    from worklist.app import create_app

    settings = get_settings()
    configure_logging(level=settings.log_level, fmt=settings.log_format, component="api")
    settings.home.mkdir(parents=True, exist_ok=True)
    upgrade(settings.effective_database_url)
    console.print(f"worklist: http://{settings.api_host}:{settings.api_port}/")
    uvicorn.run(create_app(settings), host=settings.api_host, port=settings.api_port, log_level="warning")
