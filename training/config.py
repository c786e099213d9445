"""Where run configurations get their defaults and their values from `cxr_triage.settings.Settings`.

Each gate threshold and retraining parameter has one default: its Settings field (CXR_GATE_*, CXR_RETRAIN_*).
The config dataclasses declare such a field with `setting(...)`, the CLI options take `setting_default(...)`, and
`GateConfig.from_settings` / `RetrainConfig.from_settings` fill them from a Settings object (the retrain task). This
module imports nothing but the settings, so the CLI stays light.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import field, fields
from typing import Any

from cxr_triage.settings import Settings

# Bootstrap resamples (patient groups) of the test-split evaluation, the gate and their CLI options.
N_BOOT = 1000

_SETTING = "cxr_setting"
_CONVERT = "cxr_convert"


def setting_default(name: str) -> Any:
    """The built-in default of Settings field `name` (not the environment's value)."""
    if name not in Settings.model_fields:
        raise KeyError(f"Settings has no field {name!r}")
    return Settings.model_fields[name].get_default(call_default_factory=True)


def setting(name: str, convert: Callable[[Any], Any] | None = None) -> Any:
    """A dataclass field taken from Settings field `name`: its default, and its value in `settings_values`.

    `convert` turns the setting's value into the field's type (e.g. `tuple` for a list setting).
    """
    default = setting_default(name)
    return field(default=convert(default) if convert else default, metadata={_SETTING: name, _CONVERT: convert})


def settings_values(cls: Any, settings: Settings) -> dict[str, Any]:
    """{field: value} of the dataclass `cls`'s `setting(...)` fields, read from `settings`."""
    values: dict[str, Any] = {}
    for f in fields(cls):
        if _SETTING in f.metadata:
            value = getattr(settings, f.metadata[_SETTING])
            convert = f.metadata[_CONVERT]
            values[f.name] = convert(value) if convert else value
    return values


def check_overrides(cls: Any, overrides: Iterable[str], *, also: Iterable[str] = ()) -> None:
    """TypeError naming the keys of `overrides` that are neither fields of the dataclass `cls` nor in `also`."""
    known = {f.name for f in fields(cls)} | set(also)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown {cls.__name__} setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")


__all__ = ["N_BOOT", "check_overrides", "setting", "setting_default", "settings_values"]
