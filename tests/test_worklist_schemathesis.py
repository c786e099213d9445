"""Property-based fuzzing of the worklist API from its OpenAPI document: no input makes the server fail."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from cxr_triage.labels import COVID19, NO_FINDING, PNEUMONIA
from cxr_triage.settings import Settings
from db.migrate import upgrade
from db.session import session_scope
from tests.test_worklist_api import (
    add_study,
    fast_password_hashes,  # noqa: F401 (autouse: scrypt at a test cost here too)
    make_settings,
)
from worklist.app import create_app
from worklist.auth import create_user, issue_token


@schemathesis.serializer('multipart/related; type="application/dicom"')
def _stow_body(ctx: Any, value: Any) -> bytes:
    """A STOW-RS body as the fuzzer generates it (bytes or text, sent as is: the route answers 4xx, never 5xx)."""
    return value if isinstance(value, bytes) else str(value).encode()


@pytest.fixture
def auth_token(api_settings: Settings) -> str:
    with session_scope(api_settings.effective_database_url) as session:
        user = create_user(session, "fuzzer", "fuzzer password")
        return issue_token(session, user.id, kind="api")


@pytest.fixture
def api_settings(pg_url: str, tmp_path: Path) -> Settings:
    upgrade(pg_url)
    settings_ = make_settings(pg_url, tmp_path / "var")
    add_study(settings_, probabilities={COVID19: 0.9, PNEUMONIA: 0.05, NO_FINDING: 0.05}, study_uid="1.2.3")
    add_study(settings_, probabilities={COVID19: 0.01, PNEUMONIA: 0.01, NO_FINDING: 0.98}, requested_priority="HIGH")
    return settings_


def _fuzz(
    operation: schemathesis.APIOperation[Any, Any, Any, Any], mode: GenerationMode, token: str
) -> Callable[[], None]:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=25,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
    )
    def run(case: Any) -> None:
        case.call_and_validate(headers={"Authorization": f"Bearer {token}"})

    return run  # type: ignore[no-any-return]


@pytest.mark.timeout(120)
def test_api_conforms_to_its_openapi_document_without_server_errors(api_settings: Settings, auth_token: str) -> None:
    """Every operation, valid and invalid inputs (25 examples each): no 5xx, responses match the document."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(api_settings))
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    assert {op.path for op in operations} >= {"/api/worklist", "/api/studies/{study_instance_uid}", "/metrics"}
    for operation in operations:
        # logout would revoke the fuzzer's token: it gets a foreign one
        token = "not-the-fuzzers-token" if operation.path == "/api/logout" else auth_token
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            run = _fuzz(operation, mode, token)
            try:
                run()
            except Unsatisfiable:  # an operation without parameters has no invalid input
                if mode is GenerationMode.POSITIVE:
                    failures.append(f"{operation.label}: no valid input can be generated")
            except (Exception, BaseExceptionGroup) as exc:
                failures.append(f"{operation.label} ({mode.value}): {str(exc)[:2000]}")
    assert not failures, "\n\n".join(failures)
