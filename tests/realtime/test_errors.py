"""Translation of redis-py errors: which chatkeep error each one becomes."""

from __future__ import annotations

import pytest
from redis import exceptions as rex

import chatkeep.realtime.client
import chatkeep.realtime.errors
from chatkeep.errors import ChatkeepError, ConfigurationError, Unavailable
from chatkeep.realtime import translate_error


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (rex.ConnectionError("refused"), Unavailable),
        (rex.TimeoutError("slow"), Unavailable),
        (rex.BusyLoadingError("loading"), Unavailable),
        (rex.ReadOnlyError("replica"), Unavailable),
        (rex.OutOfMemoryError("oom"), Unavailable),
        (OSError("network unreachable"), Unavailable),
        (rex.AuthenticationError("wrong password"), ConfigurationError),
        (rex.NoPermissionError("acl"), ConfigurationError),
        (rex.ResponseError("WRONGTYPE"), ChatkeepError),
        (rex.DataError("bad"), ChatkeepError),
    ],
)
def test_errors_are_translated(error: Exception, expected: type[ChatkeepError]) -> None:
    translated = translate_error(error, "op.name")
    assert type(translated) is expected
    assert "op.name" in str(translated)


def test_credentials_error_names_the_field() -> None:
    translated = translate_error(rex.AuthenticationError("x"), "ping")
    assert isinstance(translated, ConfigurationError)
    assert translated.field == "redis_url"


def test_translate_error_is_importable_from_its_old_home() -> None:
    assert "translate_error" in chatkeep.realtime.client.__all__
    assert chatkeep.realtime.client.translate_error is chatkeep.realtime.errors.translate_error
    assert translate_error is chatkeep.realtime.errors.translate_error
