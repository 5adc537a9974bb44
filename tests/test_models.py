from __future__ import annotations

import copy
import dataclasses
import json
import pickle
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, TypeAdapter, ValidationError

from chatkeep.errors import InvalidInput
from chatkeep.models import (
    CONTENT_MAX_LENGTH,
    CreateMessageDto,
    CreateRoomBody,
    CreateRoomDto,
    CreateUserDto,
    CursorPage,
    EditMessageBody,
    Message,
    MessageReadStatus,
    MessageWithUser,
    Room,
    RoomMember,
    RoomSummary,
    RoomUser,
    RoomWithUsers,
    SendMessageBody,
    UnreadCounts,
    UpdateRoomDto,
    UpdateUserDto,
    User,
    UserProfile,
    canonical_email,
    canonical_username,
    check_content,
    check_password,
)

ROOM = uuid.uuid4()
USER = uuid.uuid4()


def user_dto(**overrides: Any) -> CreateUserDto:
    values: dict[str, Any] = {
        "email": "ann@example.org",
        "username": "ann",
        "password": "correct horse",
    }
    values.update(overrides)
    return CreateUserDto.checked(**values)


def error_of(call: Any) -> InvalidInput | None:
    try:
        call()
    except InvalidInput as exc:
        return exc
    return None


def rule_of(call: Any) -> tuple[str, str]:
    with pytest.raises(InvalidInput) as info:
        call()
    return info.value.field, info.value.rule


# -- email --------------------------------------------------------------------------------


def test_email_is_canonical_lower_case() -> None:
    assert user_dto(email="  Ann.Lee+chat@Example.ORG ").email == "ann.lee+chat@example.org"


@pytest.mark.parametrize(
    "email",
    [
        "",
        "ann",
        "@example.org",
        "ann@",
        "ann@localhost",
        "ann@@example.org",
        "a nn@example.org",
        "ann@exa mple.org",
        "ann..lee@example.org",
        ".ann@example.org",
        "ann@-example.org",
        "ann@1.2.3.4",
        "ännchen@example.org",
        "ann@" + "a" * 250 + ".org",
        "a" * 65 + "@example.org",
        "ann\x00@example.org",
    ],
)
def test_bad_emails_are_refused(email: str) -> None:
    field, _ = rule_of(lambda: user_dto(email=email))
    assert field == "email"


def test_canonical_email_helper() -> None:
    assert canonical_email("X@Y.io") == "x@y.io"
    assert rule_of(lambda: canonical_email("nope"))[0] == "email"
    assert rule_of(lambda: canonical_email(3))[0] == "email"  # type: ignore[arg-type]


# -- username -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("Ann", "ann"),
        ("ANN_lee.2-b", "ann_lee.2-b"),
        ("\uff21\uff4e\uff4e", "ann"),  # full-width letters fold to ASCII (NFKC)
        ("ﬁne", "fine"),  # the fi ligature
        ("  bob  ", "bob"),
    ],
)
def test_usernames_are_nfkc_lower_case(raw: str, canonical: str) -> None:
    assert user_dto(username=raw).username == canonical
    assert canonical_username(raw) == canonical


@pytest.mark.parametrize(
    ("raw", "rule_part"),
    [
        ("ab", "3 to 32"),
        ("a" * 33, "3 to 32"),
        ("a" * 1000, "3 to 32"),
        ("\u0430nn", "only a-z"),  # Cyrillic a: a look-alike from another script
        ("ann lee", "only a-z"),
        ("_ann", "starting with"),
        ("ann\x00", "only a-z"),
        ("ann'; DROP TABLE users;--", "only a-z"),
    ],
)
def test_bad_usernames_are_refused(raw: str, rule_part: str) -> None:
    field, rule = rule_of(lambda: user_dto(username=raw))
    assert field == "username"
    assert rule_part in rule


def test_username_type_is_checked() -> None:
    assert rule_of(lambda: user_dto(username=42)) == ("username", "must be a string")
    assert rule_of(lambda: canonical_username(None))[0] == "username"  # type: ignore[arg-type]


# -- password -----------------------------------------------------------------------------


def test_password_is_secret_in_reprs() -> None:
    dto = user_dto(password="hunter2hunter2")
    assert "hunter2" not in repr(dto)
    assert "hunter2" not in str(dto)
    assert "hunter2" not in str(dto.model_dump())
    assert dto.password.get_secret_value() == "hunter2hunter2"


def test_password_limits_are_in_bytes() -> None:
    assert check_password("é" * 36) == "é" * 36  # 72 bytes: the most bcrypt reads
    field, rule = rule_of(lambda: user_dto(password="é" * 37))  # 74 bytes, 37 characters
    assert field == "password"
    assert "72 bytes" in rule
    assert "72 bytes" in rule_of(lambda: check_password("x" * 73))[1]
    assert "at least 8" in rule_of(lambda: check_password("short"))[1]
    assert "NUL" in rule_of(lambda: check_password("abcdefgh\x00"))[1]
    assert "Unicode" in rule_of(lambda: check_password("abcdefgh\ud800"))[1]
    assert rule_of(lambda: check_password(b"bytes-not-str"))[0] == "password"  # type: ignore[arg-type]


def test_password_error_never_echoes_the_password() -> None:
    with pytest.raises(InvalidInput) as info:
        user_dto(password="sekrit" * 20)
    assert "sekrit" not in str(info.value)
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


# -- avatar -------------------------------------------------------------------------------


def test_avatar_urls() -> None:
    assert user_dto(avatar_url="https://cdn.example.org/a.png").avatar_url
    for bad in (
        "javascript:alert(1)",
        "ftp://example.org/a.png",
        "https://",
        "//example.org/a.png",
        "https://example.org/" + "a" * 2048,
        "https://exa mple.org/",
        "http://[::1",
    ):
        assert rule_of(lambda bad=bad: user_dto(avatar_url=bad))[0] == "avatar_url"


def test_update_user_dto_tracks_what_was_given() -> None:
    assert UpdateUserDto().model_dump(exclude_unset=True) == {}
    assert UpdateUserDto(avatar_url=None).model_dump(exclude_unset=True) == {"avatar_url": None}
    assert UpdateUserDto(username="Zed").username == "zed"
    assert rule_of(lambda: UpdateUserDto.checked(username=None))[0] == "username"
    extra: dict[str, Any] = {"nickname": "x"}
    assert rule_of(lambda: UpdateUserDto.checked(**extra))[0] == "nickname"


# -- content ------------------------------------------------------------------------------


def message_dto(**overrides: Any) -> CreateMessageDto:
    values: dict[str, Any] = {"room_id": ROOM, "user_id": USER, "content": "hello"}
    values.update(overrides)
    return CreateMessageDto.checked(**values)


@pytest.mark.parametrize(
    ("content", "rule_part"),
    [
        ("", "at least 1 character"),
        (" \t\r\n", "empty"),
        ("x" * (CONTENT_MAX_LENGTH + 1), "at most 10000"),
        ("a\x00b", "NUL"),
        ("a\udc80b", "Unicode"),
        (7, "string"),
    ],
)
def test_bad_content_is_refused(content: Any, rule_part: str) -> None:
    field, rule = rule_of(lambda: message_dto(content=content))
    assert field == "content"
    assert rule_part.lower() in rule.lower()


def test_content_at_the_limit_and_helper() -> None:
    assert len(message_dto(content="é" * CONTENT_MAX_LENGTH).content) == CONTENT_MAX_LENGTH
    assert check_content("  padded  ") == "  padded  "  # kept verbatim
    assert rule_of(lambda: check_content(None))[0] == "content"  # type: ignore[arg-type]
    assert rule_of(lambda: check_content(""))[0] == "content"


def test_message_dto_other_fields() -> None:
    assert message_dto(client_msg_id="0f8c-Ab_1:x").client_msg_id == "0f8c-Ab_1:x"
    for bad in ("", "has space", "x" * 65, "naïve"):
        assert rule_of(lambda bad=bad: message_dto(client_msg_id=bad))[0] == "client_msg_id"
    assert rule_of(lambda: message_dto(type="video"))[0] == "type"
    assert rule_of(lambda: message_dto(room_id="not-a-uuid"))[0] == "room_id"
    assert rule_of(lambda: CreateMessageDto.checked(room_id=ROOM))[0] == "user_id"
    assert (
        CreateMessageDto.model_validate(
            {"room_id": str(ROOM), "user_id": str(USER), "content": "x"}
        ).room_id
        == ROOM
    )


# -- rooms --------------------------------------------------------------------------------


def test_room_dtos() -> None:
    dto = CreateRoomDto(name="  general  ", created_by=USER)
    assert dto.name == "general"
    assert dto.type == "public"
    assert rule_of(lambda: CreateRoomDto.checked(name="   ", created_by=USER))[0] == "name"
    assert rule_of(lambda: CreateRoomDto.checked(name="x" * 101, created_by=USER))[0] == "name"
    assert rule_of(lambda: CreateRoomDto.checked(name="x\x00", created_by=USER))[0] == "name"
    assert (
        rule_of(lambda: CreateRoomDto.checked(name="dm", type="direct", created_by=USER))[0]
        == "type"
    )
    long_description = "d" * 1001
    assert (
        rule_of(
            lambda: CreateRoomDto.checked(name="a", description=long_description, created_by=USER)
        )[0]
        == "description"
    )
    assert UpdateRoomDto(description=None).model_dump(exclude_unset=True) == {"description": None}
    assert rule_of(lambda: UpdateRoomDto.checked(name=None))[0] == "name"


def test_dtos_are_frozen() -> None:
    dto = message_dto()
    with pytest.raises(Exception, match="frozen"):
        dto.content = "changed"  # type: ignore[misc]


# -- read models --------------------------------------------------------------------------


def _names(cls: type[Any]) -> set[str]:
    return {field.name for field in dataclasses.fields(cls)}


def test_user_has_no_password_hash_and_gives_a_profile() -> None:
    assert "password_hash" not in _names(User)
    now = datetime.now(UTC)
    user = User(
        id=USER, email="a@b.co", username="abc", created_at=now, updated_at=now, avatar_url=None
    )
    assert user.profile() == UserProfile(id=USER, username="abc", avatar_url=None)
    assert "email" not in _names(UserProfile)


ROW_CLASSES: tuple[type[Any], ...] = (
    User,
    UserProfile,
    Room,
    RoomUser,
    RoomMember,
    RoomWithUsers,
    RoomSummary,
    Message,
    MessageWithUser,
    MessageReadStatus,
    CursorPage,
)


@pytest.mark.parametrize("cls", ROW_CLASSES, ids=lambda cls: cls.__name__)
def test_rows_are_frozen_dataclasses_not_pydantic_models(cls: type[Any]) -> None:
    # Rows leaned on pydantic's private slots (issue 10): a pydantic release could break
    # them. Plain dataclasses depend on nothing but the standard library.
    assert dataclasses.is_dataclass(cls)
    assert not issubclass(cls, BaseModel)
    assert cls.__dataclass_params__.frozen  # type: ignore[attr-defined]


def test_rows_built_without_validation_behave_like_validated_rows() -> None:
    now = datetime.now(UTC)
    profile = UserProfile._from_row({"id": USER, "username": "abc", "avatar_url": None})
    message = MessageWithUser._from_row(
        {
            "id": uuid.uuid4(),
            "room_id": ROOM,
            "user_id": USER,
            "seq": 1,
            "client_msg_id": None,
            "content": "hi",
            "type": "text",
            "is_edited": False,
            "edited_at": None,
            "created_at": now,
            "user": profile,
        }
    )
    adapter = TypeAdapter(MessageWithUser)
    dumped = adapter.dump_python(message)
    assert dumped["user"] == {"id": USER, "username": "abc", "avatar_url": None}
    assert dataclasses.asdict(message) == dumped
    assert message == adapter.validate_python(dumped)
    assert message == adapter.validate_json(adapter.dump_json(message))
    assert isinstance(message, Message)
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.seq = 2  # type: ignore[misc]


def test_cursor_page_is_generic() -> None:
    page = CursorPage[int](items=(1, 2), before="b", after=None)
    assert page.items == (1, 2)
    assert page.newest is None
    assert TypeAdapter(CursorPage[int]).validate_python({"items": ["3"]}).items == (3,)


# -- properties ---------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_any_text_either_passes_or_names_the_field(text: str) -> None:
    for build, field in (
        (lambda: user_dto(username=text), "username"),
        (lambda: user_dto(email=text), "email"),
        (lambda: user_dto(password=text), "password"),
        (lambda: message_dto(content=text), "content"),
        (lambda: CreateRoomDto.checked(name=text, created_by=USER), "name"),
    ):
        error = error_of(build)
        if error is not None:
            assert (error.field, bool(error.rule)) == (field, True)


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=CONTENT_MAX_LENGTH))
def test_valid_content_is_kept_verbatim(text: str) -> None:
    if "\x00" in text or not text.strip(" \t\r\n"):
        assert rule_of(lambda: message_dto(content=text))[0] == "content"
    else:
        assert message_dto(content=text).content == text


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), min_size=3, max_size=32))
def test_usernames_canonical_form_is_idempotent(text: str) -> None:
    try:
        name = canonical_username(text)
    except InvalidInput:
        return
    assert canonical_username(name) == name
    assert canonical_username(name.upper()) == name
    assert name.isascii()


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=200_000))
def test_huge_and_binary_input_is_refused_cheaply(blob: bytes) -> None:
    text = blob.decode("latin-1") * 3
    error = error_of(lambda: message_dto(content=text))
    assert error is None or error.field == "content"


def test_public_exports_are_complete() -> None:
    import chatkeep
    import chatkeep.models
    import chatkeep.storage

    for module in (chatkeep.models, chatkeep.storage, chatkeep):
        for name in module.__all__:
            assert getattr(module, name) is not None
    classes = {
        name
        for name, value in vars(chatkeep.models).items()
        if isinstance(value, type)
        and not name.startswith("_")
        and value.__module__ == "chatkeep.models"
    }
    assert classes <= set(chatkeep.models.__all__)
    # Every model class is also importable from the package root.
    assert classes <= set(chatkeep.__all__)


def test_unread_counts_is_a_read_only_mapping() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    counts = UnreadCounts([(a, 3), (b, 0)])
    assert list(counts) == [a, b]
    assert list(counts.items()) == [(a, 3), (b, 0)]
    assert list(counts.values()) == [3, 0]
    assert counts._index is None  # iterating needed no index
    assert counts[a] == 3
    assert b in counts
    assert uuid.uuid4() not in counts
    assert counts.get(uuid.uuid4(), -1) == -1
    assert counts == {a: 3, b: 0}
    assert counts.total() == 3
    assert len(counts) == 2
    assert repr(counts) == f"UnreadCounts({{{a!r}: 3, {b!r}: 0}})"
    assert UnreadCounts() == {}


def test_unread_counts_carry_badges_when_read_with_them() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    # Rows as chatkeep_unread returns them (migration 020): the mapping is unchanged.
    counts = UnreadCounts([(a, 5, 2, 1, 1), (b, 0, 0, 0, 0)])
    assert counts == {a: 5, b: 0}
    assert counts.total() == 5
    assert list(counts.items()) == [(a, 5), (b, 0)]
    assert counts.has_badges
    badge = counts.badge(a)
    assert badge is not None
    assert (badge.room_id, badge.unread, badge.mentions) == (a, 5, 2)
    assert (badge.unread_threads, badge.thread_mentions) == (1, 1)
    assert set(counts.badges()) == {a, b}
    assert TypeAdapter(UnreadCounts).dump_python(counts) == {a: 5, b: 0}
    with pytest.raises(KeyError):
        counts.badge(uuid.uuid4())
    # Pairs only (a repository call without as_user, Citus mode): no badges.
    plain = UnreadCounts([(a, 5)])
    assert not plain.has_badges
    assert plain.badge(a) is None
    assert plain.badges() == {}
    assert not UnreadCounts().has_badges


def test_unread_counts_serialise_through_pydantic_as_a_dict() -> None:
    # Before: pydantic had no schema for it, so FastAPI could not use it as a return type.

    class _UnreadResponse(BaseModel):
        """What a FastAPI response model holding the counts looks like."""

        counts: UnreadCounts

    a, b = uuid.uuid4(), uuid.uuid4()
    counts = UnreadCounts([(a, 3), (b, 0)])
    adapter = TypeAdapter(UnreadCounts)
    assert adapter.dump_python(counts) == {a: 3, b: 0}
    assert json.loads(adapter.dump_json(counts)) == {str(a): 3, str(b): 0}
    assert adapter.validate_python(counts) is counts
    assert adapter.validate_json(adapter.dump_json(counts)) == counts
    again = adapter.validate_python({str(a): "3"})
    assert type(again) is UnreadCounts
    assert dict(again) == {a: 3}
    with pytest.raises(ValidationError):
        adapter.validate_python({"not-a-uuid": 1})
    response = _UnreadResponse(counts=counts)
    assert json.loads(response.model_dump_json()) == {"counts": {str(a): 3, str(b): 0}}
    assert _UnreadResponse.model_validate_json(response.model_dump_json()) == response
    schema = _UnreadResponse.model_json_schema()["properties"]["counts"]
    assert schema["type"] == "object"
    assert schema["additionalProperties"] == {"type": "integer"}


# -- rows built from the database behave like rows built by hand --------------------------


def _message_values() -> dict[str, Any]:
    return {
        "id": uuid.uuid4(),
        "room_id": uuid.uuid4(),
        "user_id": uuid.uuid4(),
        "seq": 7,
        "client_msg_id": "c-1",
        "content": "hello",
        "type": "text",
        "is_edited": False,
        "edited_at": None,
        "created_at": datetime.now(UTC),
        "reply_to": None,
    }


def test_rows_built_from_the_database_behave_like_rows_built_by_hand() -> None:
    values = _message_values()
    row = Message._from_row(values)
    by_hand = Message(**values)
    validated = TypeAdapter(Message).validate_python(
        {**values, "id": str(values["id"]), "seq": "7"}
    )
    assert row == by_hand == validated
    assert by_hand == row
    assert hash(row) == hash(by_hand) == hash(validated)
    assert repr(row) == repr(by_hand)
    assert vars(row) == vars(by_hand)  # the same fields, nothing more
    assert dataclasses.asdict(row) == dataclasses.asdict(by_hand) == values
    assert TypeAdapter(Message).dump_json(row) == TypeAdapter(Message).dump_json(by_hand)
    assert TypeAdapter(Message).dump_python(row, mode="json")["id"] == str(values["id"])
    assert pickle.loads(pickle.dumps(row)) == row  # noqa: S301 - our own bytes
    assert copy.copy(row) == row
    assert copy.deepcopy(row) == row
    edited = dataclasses.replace(row, content="edited", is_edited=True)
    assert (edited.content, edited.is_edited, row.content) == ("edited", True, "hello")
    assert type(edited) is Message
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.content = "changed"  # type: ignore[misc]
    assert row != MessageWithUser(**values, user=UserProfile(id=values["user_id"], username="a"))


class _HistoryResponse(BaseModel):
    """What a FastAPI response model holding a page looks like."""

    page: CursorPage[MessageWithUser]
    user: User | None = None


def test_rows_are_pydantic_field_types() -> None:
    # FastAPI builds its response models this way from return annotations.
    values = _message_values()
    author = UserProfile(id=values["user_id"], username="ann")
    page = CursorPage(items=(MessageWithUser(**values, user=author),), newest="n")
    response = _HistoryResponse(page=page)
    assert response.page is page  # an instance passes as it is, not rebuilt
    dumped = json.loads(response.model_dump_json())
    assert dumped["page"]["items"][0]["user"] == {
        "id": str(author.id),
        "username": "ann",
        "avatar_url": None,
    }
    assert dumped["page"]["newest"] == "n"
    assert _HistoryResponse.model_validate_json(response.model_dump_json()) == response
    schema = _HistoryResponse.model_json_schema()
    assert "MessageWithUser" in schema["$defs"]
    assert "password_hash" not in schema["$defs"]["User"]["properties"]


def test_a_page_copies_with_replace() -> None:
    page = CursorPage(items=(Message._from_row(_message_values()),), newest="n")
    assert set(TypeAdapter(CursorPage[Message]).dump_python(page)) == {
        "items",
        "before",
        "after",
        "newest",
    }
    assert dataclasses.replace(page, before="b").before == "b"
    assert page.before is None


# -- pydantic-native validation (issue 15) ------------------------------------------------


def test_a_dto_reports_every_problem_as_a_validation_error() -> None:
    # Before: the first problem only, as InvalidInput raised while pydantic validated, so
    # FastAPI answered 500 instead of 422.
    with pytest.raises(ValidationError) as info:
        CreateUserDto(email="nope", username="_x", password="short", avatar_url="ftp://x")
    assert [error["loc"] for error in info.value.errors()] == [
        ("email",),
        ("username",),
        ("password",),
        ("avatar_url",),
    ]
    assert "short" not in str(info.value)  # inputs are hidden from the text
    with pytest.raises(ValidationError):
        CreateMessageDto.model_validate({"room_id": ROOM})
    with pytest.raises(ValidationError):
        TypeAdapter(CreateRoomDto).validate_json('{"name": " ", "created_by": "x"}')


def test_invalid_input_carries_every_problem() -> None:
    with pytest.raises(InvalidInput) as info:
        CreateMessageDto.checked(room_id="x", user_id=USER, content="", client_msg_id="a b")
    error = info.value
    problems = [(problem.field, problem.rule) for problem in error.errors]
    assert [field for field, _ in problems] == ["room_id", "content", "client_msg_id"]
    assert problems[1][1] == "String should have at least 1 character"
    assert (error.field, error.rule) == problems[0]
    assert "UUID" in error.rule
    assert "pattern" in problems[2][1]
    assert str(error).count(";") == 2
    assert error.__cause__ is None
    single = InvalidInput("f", "r")
    assert single.errors == (single,)


def test_the_json_schema_states_the_rules() -> None:
    user = CreateUserDto.model_json_schema()
    props = user["properties"]
    assert props["email"]["format"] == "email"
    assert props["email"]["maxLength"] == 254
    assert (props["username"]["minLength"], props["username"]["maxLength"]) == (3, 32)
    assert props["username"]["pattern"]
    assert props["password"]["minLength"] == 8
    assert props["password"]["writeOnly"] is True
    assert props["avatar_url"]["anyOf"][0]["format"] == "uri"
    message = CreateMessageDto.model_json_schema()["properties"]
    assert message["content"]["maxLength"] == CONTENT_MAX_LENGTH
    assert message["room_id"]["format"] == "uuid"
    assert message["client_msg_id"]["anyOf"][0]["maxLength"] == 64
    room = CreateRoomDto.model_json_schema()["properties"]
    assert room["name"]["maxLength"] == 100
    assert room["description"]["anyOf"][0]["maxLength"] == 1000
    for model in (
        CreateUserDto,
        CreateMessageDto,
        CreateRoomDto,
        CreateRoomBody,
        SendMessageBody,
        UpdateUserDto,
        UpdateRoomDto,
    ):
        text = json.dumps(model.model_json_schema())
        assert ">>>" not in text
        assert ":class:" not in text
        assert "``" not in text


def test_request_bodies_leave_out_what_the_server_knows() -> None:
    body = CreateRoomBody(name=" plans ", type="private")
    assert "created_by" not in CreateRoomBody.model_fields
    dto = body.by(USER)
    assert (dto.name, dto.type, dto.created_by) == ("plans", "private", USER)
    assert rule_of(lambda: body.by("not-a-uuid"))[0] == "created_by"  # type: ignore[arg-type]
    assert set(SendMessageBody.model_fields) == {"content", "type", "client_msg_id"}
    with pytest.raises(ValidationError):
        SendMessageBody(content="x", type="system")  # the server's to write
    assert EditMessageBody(content="again").content == "again"
    with pytest.raises(ValidationError):
        EditMessageBody(content=" \n")
