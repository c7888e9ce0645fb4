"""The settings loader: parsing by annotation, environment beneath flags, masking, generated flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from producer.client import ClientConfig
from producer.gateway.settings import GatewaySettings
from producer.settings import EXPLICIT_NONE, add_flags, describe, load, mask_url, options, read, setting


@dataclass(slots=True)
class Sample:
    url: str = setting("redis://localhost:6379/0", help="where")
    count: int = setting(3, help="how many")
    ratio: float = 0.5
    enabled: bool = setting(True, help="on or off")
    limit: int | None = None
    name: str | None = "x"
    token: str = setting("", secret=True, flag=False)
    pid: int = setting(0, env=False)
    items: list[int] | None = None  # no parser for lists: never read


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("true", True),
        ("TRUE", True),
        ("Yes", True),
        ("1", True),
        ("false", False),
        ("No", False),
        ("0", False),
        (" yes ", True),
    ],
)
def test_booleans_accept_true_false_1_0_yes_no(raw: str, value: bool) -> None:
    assert read(Sample, environ={"TOKENRELAY_ENABLED": raw}) == {"enabled": value}


@pytest.mark.parametrize("raw", ["maybe", "on", "off", "2", "y", "t", "truee"])
def test_booleans_refuse_anything_else_naming_the_variable(raw: str) -> None:
    with pytest.raises(ValueError, match=f"TOKENRELAY_ENABLED: expected true/false, 1/0 or yes/no, got '{raw}'"):
        read(Sample, environ={"TOKENRELAY_ENABLED": raw})


def test_numbers_parse_by_annotation_and_refuse_text() -> None:
    got = load(Sample, environ={"TOKENRELAY_COUNT": "7", "TOKENRELAY_RATIO": "0.25"})
    assert (got.count, got.ratio) == (7, 0.25)
    with pytest.raises(ValueError, match="TOKENRELAY_COUNT: expected an integer, got '7.5'"):
        read(Sample, environ={"TOKENRELAY_COUNT": "7.5"})
    with pytest.raises(ValueError, match="TOKENRELAY_RATIO: expected a number"):
        read(Sample, environ={"TOKENRELAY_RATIO": "half"})


def test_optional_fields_read_none_and_values() -> None:
    assert read(Sample, environ={"TOKENRELAY_LIMIT": "12", "TOKENRELAY_NAME": "None"}) == {"limit": 12, "name": None}
    # a required int has no None: the word is refused like any other text
    with pytest.raises(ValueError, match="TOKENRELAY_COUNT"):
        read(Sample, environ={"TOKENRELAY_COUNT": "none"})


def test_overrides_beat_the_environment_which_beats_defaults() -> None:
    environ = {"TOKENRELAY_COUNT": "7", "TOKENRELAY_URL": "redis://env:1/0", "TOKENRELAY_ENABLED": "no"}
    got = load(Sample, {"count": 9, "url": None, "enabled": None}, environ=environ)
    assert (got.count, got.url, got.enabled, got.ratio) == (9, "redis://env:1/0", False, 0.5)


def test_empty_variables_and_unread_fields_leave_defaults() -> None:
    environ = {"TOKENRELAY_COUNT": "", "TOKENRELAY_PID": "5", "TOKENRELAY_ITEMS": "[1]"}
    assert read(Sample, environ=environ) == {}
    assert [o.name for o in options(Sample)] == ["url", "count", "ratio", "enabled", "limit", "name", "token", "pid"]


def test_an_override_that_names_no_field_is_refused() -> None:
    with pytest.raises(TypeError, match=r"Sample: unknown setting\(s\) \['cuont'\]"):
        read(Sample, {"cuont": 3})


def test_passwords_and_secrets_are_masked() -> None:
    assert mask_url("redis://worker:s3cret@redis:6379/0") == "redis://worker:***@redis:6379/0"
    assert mask_url("rediss://:s3cret@redis:6379/0") == "rediss://:***@redis:6379/0"
    assert mask_url("redis://localhost:6379/0") == "redis://localhost:6379/0"
    described = describe(Sample(url="redis://u:pw@h:1/0", token="abc", limit=None))
    assert described["url"] == "redis://u:***@h:1/0" and described["token"] == "***"
    assert "limit" not in described and described["count"] == 3


def _parser(**kwargs: object) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t")
    add_flags(parser, Sample, **kwargs)  # type: ignore[arg-type]
    return parser


def test_flags_come_from_the_fields() -> None:
    parser = _parser(flags={"url": "--to"})
    assert vars(parser.parse_args([])) == {
        "url": None,
        "count": None,
        "ratio": None,
        "enabled": None,
        "limit": None,
        "name": None,
        "pid": None,
    }
    args = parser.parse_args(["--to", "redis://x:1/0", "--count", "4", "--enabled", "no", "--limit", "none"])
    assert (args.url, args.count, args.enabled, args.limit) == ("redis://x:1/0", 4, False, EXPLICIT_NONE)
    # a flag's "none" is None itself, so it beats a variable (a plain None override means "not given")
    got = load(Sample, vars(args), environ={"TOKENRELAY_LIMIT": "8", "TOKENRELAY_NAME": "env"})
    assert (got.limit, got.name, got.count) == (None, "env", 4)
    assert parser.parse_args(["--enabled"]).enabled is True
    text = parser.format_help()
    assert "how many (default 3; env TOKENRELAY_COUNT)" in text and "--token" not in text
    assert "(default 0)" in text  # env=False: no variable to name


def test_a_bad_flag_value_is_a_usage_error_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(["--enabled", "sure"])
    assert exit_info.value.code == 2
    assert "argument --enabled: expected true/false, 1/0 or yes/no, got 'sure'" in capsys.readouterr().err


def test_the_client_reads_the_variables_it_always_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENRELAY_REDIS_URL", "redis://c:1/0")
    monkeypatch.setenv("TOKENRELAY_MODEL", "m")
    monkeypatch.setenv("TOKENRELAY_PREFIX", "p")
    monkeypatch.setenv("TOKENRELAY_MAX_QUEUE_DEPTH", "5")
    config = ClientConfig.from_env(prefix="q", model=None)
    assert (config.redis_url, config.model, config.prefix, config.max_queue_depth) == ("redis://c:1/0", "m", "q", 5)
    monkeypatch.setenv("TOKENRELAY_MODEL", "")  # as before: an empty variable is not a model name
    assert ClientConfig.from_env().model == ClientConfig().model


def test_the_gateway_reads_its_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENRELAY_MAX_QUEUE_DEPTH", "50")
    monkeypatch.setenv("TOKENRELAY_REQUEST_TIMEOUT_S", "0.5")
    settings = GatewaySettings.from_env(port=9000, host=None)
    assert (settings.max_queue_depth, settings.request_timeout_s, settings.port, settings.host) == (
        50,
        0.5,
        9000,
        "127.0.0.1",
    )
    assert GatewaySettings.from_env(redis_url="redis://g:pw@h:1/0").describe()["redis_url"] == "redis://g:***@h:1/0"
