"""`cxr-triage users ...` (accounts and API tokens) and `cxr-triage api` (the worklist API and page)."""

from __future__ import annotations

import sys
from collections.abc import Callable

import typer
from rich.console import Console
from sqlalchemy import select
from sqlalchemy.orm import Session

from cxr_triage.logs import configure_logging
from cxr_triage.settings import get_settings
from db.session import session_scope
from db.worklist_models import User
from worklist.auth import AuthError, check_password_policy, create_user, issue_token, set_password

users_app = typer.Typer(help="Worklist users and API tokens.")
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


PASSWORD_STDIN = typer.Option(False, "--password-stdin", help="Read the password from standard input.")


def _with_password(change: Callable[[Session, str, str], object], username: str, password_stdin: bool) -> None:
    """Read the password, check the policy, apply `change` in one transaction; an AuthError becomes a usage error
    (exit status 2, with the reason)."""
    password = _password(password_stdin)
    try:
        check_password_policy(username, password, min_length=get_settings().password_min_length)
        with session_scope(_url()) as session:
            change(session, username, password)
    except AuthError as exc:
        raise typer.BadParameter(str(exc)) from exc


@users_app.command("create")
def users_create(username: str, password_stdin: bool = PASSWORD_STDIN) -> None:
    """Create a user (at least CXR_PASSWORD_MIN_LENGTH characters, not the username; stored as a scrypt hash)."""
    _with_password(create_user, username, password_stdin)
    console.print(f"created user {username}")


@users_app.command("passwd")
def users_passwd(username: str, password_stdin: bool = PASSWORD_STDIN) -> None:
    """Change a user's password (same policy as `create`; signs out their browser sessions)."""
    _with_password(set_password, username, password_stdin)
    console.print(f"password changed for {username}")


@users_app.command("token")
def users_token(username: str, name: str = typer.Option("cli", help="What the token is for.")) -> None:
    """Issue an API token (Authorization: Bearer ...) for the user; it is shown once."""
    with session_scope(_url()) as session:
        user = session.scalar(select(User).where(User.username == username))
        if user is None:
            raise typer.BadParameter(f"no user {username!r}")
        token = issue_token(session, user.id, kind="api", name=name)
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
    with session_scope(_url()) as session:
        user = session.scalar(select(User).where(User.username == username))
        if user is None:
            raise typer.BadParameter(f"no user {username!r}")
        user.is_active = False
    console.print(f"disabled {username}")


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
