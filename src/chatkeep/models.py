"""Typed, frozen models of what chatkeep stores, and the DTOs that validate what goes in.

Two kinds of model live here:

* **DTOs** (``CreateUserDto``, ``UpdateUserDto``, ``CreateRoomDto``, ``UpdateRoomDto``,
  ``CreateMessageDto``) carry caller input, and the **request bodies** (``CreateRoomBody``,
  ``SendMessageBody``, ``EditMessageBody``) the same rules without the fields a server
  takes from the logged-in user. They are plain pydantic models: constructing or
  validating one checks every rule below and raises pydantic's ``ValidationError`` with
  *every* problem at once, which web frameworks answer themselves (FastAPI with a 422),
  and the rules are in their JSON schema (lengths, patterns, formats). For chatkeep's own
  exception instead, build one with ``Dto.checked(...)``, or convert with
  :func:`invalid_input`: :class:`chatkeep.errors.InvalidInput` names the first field and
  rule and carries all of them in ``errors``. The library's own calls raise
  ``InvalidInput``, never ``ValidationError``.
* **Read models** (``User``, ``UserProfile``, ``Room``, ``RoomWithUsers``, ``RoomMember``,
  ``RoomSummary``, ``Message``, ``MessageWithUser``, ``RoomUser``, ``MessageReadStatus``,
  ``CursorPage``) describe stored rows. They are frozen standard-library dataclasses, not
  pydantic models: repositories build them from rows the database has already checked
  (the CHECK constraints repeat these rules), so they skip validation, and a page of 50
  messages with authors costs microseconds, not the ~5 us per message pydantic validation
  would (``docs/performance.md`` has the figures). Pydantic and FastAPI take dataclasses
  as field and return types: ``TypeAdapter(Message).dump_json(message)`` serialises a
  row, ``dataclasses.replace(row, content=...)`` copies one with changes,
  ``dataclasses.asdict(row)`` gives its fields as a dict. ``UnreadCounts`` is a read-only
  mapping that pydantic serialises as ``dict[UUID, int]``.

Rules (each is one ``(field, rule)`` problem):

========== ==============================================================================
email      ``local@domain``, ASCII, at most 254 characters (local part at most 64); stored
           lower-cased, so ``Ann@X.org`` and ``ann@x.org`` are the same account
username   NFKC-normalised then lower-cased, 3 to 32 characters from ``a-z 0-9 _ . -``,
           starting with a letter or digit: case variants and compatibility look-alikes
           (full-width letters, ligatures) collide, other scripts' look-alikes are refused
password   at least 8 characters and at most 72 bytes in UTF-8 (bcrypt reads no further;
           a longer password is refused, never silently truncated); no NUL
avatar_url ``http://`` or ``https://`` with a host, at most 2048 characters
content    1 to 10000 characters, not only whitespace, no NUL, valid Unicode
room name  1 to 100 characters, not only whitespace, no NUL
emoji      1 to 64 bytes in UTF-8; only emoji material: symbols (``So``, ``Sk``),
           combining and enclosing marks (skin tones' modifiers, variation selectors,
           the keycap), digits, ``#`` and ``*`` (keycaps), the zero-width joiner and tag
           characters (flag sequences); at least one symbol or keycap. No letters,
           whitespace, control or unassigned characters
========== ==============================================================================

``password_hash`` is not a field of any model here: it never leaves the storage layer.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
import uuid
from collections.abc import Callable, ItemsView, Iterator, Mapping, Sequence, ValuesView
from dataclasses import dataclass
from datetime import datetime
from typing import (
    TYPE_CHECKING,
    Annotated,
    Any,
    ClassVar,
    Final,
    Generic,
    Literal,
    Self,
    TypeVar,
    get_args,
)
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_core import PydanticCustomError, core_schema

from chatkeep.errors import InvalidInput

if TYPE_CHECKING:
    from asyncpg import Record

__all__ = [
    "CHANGE_KINDS",
    "CONTENT_MAX_LENGTH",
    "EMOJI_MAX_BYTES",
    "PASSWORD_MAX_BYTES",
    "PASSWORD_MIN_LENGTH",
    "SCHEMA_CONFIG",
    "SNIPPET_START",
    "SNIPPET_STOP",
    "USERNAME_MAX_LENGTH",
    "USERNAME_MIN_LENGTH",
    "Change",
    "ChangeKind",
    "ChangePage",
    "CreateMessageDto",
    "CreateRoomBody",
    "CreateRoomDto",
    "CreateUserDto",
    "CursorPage",
    "EditMessageBody",
    "FollowedThread",
    "Mention",
    "Message",
    "MessageReadStatus",
    "MessageType",
    "MessageWithUser",
    "ReactionCount",
    "Room",
    "RoomBadges",
    "RoomMember",
    "RoomRole",
    "RoomSummary",
    "RoomType",
    "RoomUser",
    "RoomWithUsers",
    "SearchHit",
    "SearchPage",
    "SendMessageBody",
    "ThreadSummary",
    "UnreadCounts",
    "UpdateRoomDto",
    "UpdateUserDto",
    "User",
    "UserProfile",
    "canonical_email",
    "canonical_username",
    "check_content",
    "check_emoji",
    "check_password",
    "invalid_input",
    "plain_description",
]

RoomType = Literal["public", "private", "direct"]
RoomRole = Literal["owner", "admin", "member"]
MessageType = Literal["text", "image", "file", "system"]

USERNAME_MIN_LENGTH: Final = 3
USERNAME_MAX_LENGTH: Final = 32
PASSWORD_MIN_LENGTH: Final = 8
PASSWORD_MAX_BYTES: Final = 72
EMAIL_MAX_LENGTH: Final = 254
EMAIL_LOCAL_MAX_LENGTH: Final = 64
URL_MAX_LENGTH: Final = 2048
CONTENT_MAX_LENGTH: Final = 10_000
ROOM_NAME_MAX_LENGTH: Final = 100
ROOM_DESCRIPTION_MAX_LENGTH: Final = 1000
CLIENT_MSG_ID_MAX_LENGTH: Final = 64
EMOJI_MAX_BYTES: Final = 64

_USERNAME_RE: Final = re.compile(r"[a-z0-9][a-z0-9_.-]*")
_EMAIL_ATOM: Final = r"[a-z0-9!#$%&'*+/=?^_`{|}~-]+"
_EMAIL_LOCAL_RE: Final = re.compile(rf"{_EMAIL_ATOM}(?:\.{_EMAIL_ATOM})*")
_EMAIL_LABEL_RE: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_CLIENT_MSG_ID_PATTERN: Final = r"^[\x21-\x7e]+$"
# What the JSON schema shows of a username (before folding: any case is taken).
_USERNAME_PATTERN: Final = r"^\s*[A-Za-z0-9][A-Za-z0-9_.-]*\s*$"
# What the database's CHECK trims before testing "not only whitespace".
_CONTENT_BLANKS: Final = " \t\r\n"


def _rule(rule: str) -> PydanticCustomError:
    # Our validators report the rule itself: pydantic collects it with the other problems
    # (its ``msg`` is the rule), invalid_input() turns it into InvalidInput.
    return PydanticCustomError("chatkeep_rule", "{rule}", {"rule": rule})


def _rule_text(exc: PydanticCustomError) -> str:
    return str((exc.context or {}).get("rule", exc.message()))


def _check_text(value: str, *, allow_nul: bool = False) -> None:
    if not allow_nul and "\x00" in value:
        raise _rule("must not contain NUL characters")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _rule("must be valid Unicode (no lone surrogates)") from None


def invalid_input(exc: ValidationError) -> InvalidInput:
    """A pydantic ``ValidationError`` as :class:`~chatkeep.errors.InvalidInput`.

    ``field`` and ``rule`` are the first problem's; ``errors`` holds every problem, each
    an ``InvalidInput`` of one field (a dotted path) and rule. The values are never
    echoed, as one may be a password; raise it ``from None`` for the same reason.
    """
    return InvalidInput.of_all(
        (".".join(str(part) for part in error["loc"]) or exc.title, error["msg"])
        for error in exc.errors(include_input=False, include_url=False)
    )


# What docstrings say in reStructuredText for the docs site, said plainly for a JSON schema.
_DOC_ROLE: Final = re.compile(r":[a-z:]+:`~?([^`]*?)(?:\s*<[^`>]*>)?`")


def _plain_role(match: re.Match[str]) -> str:
    text = match.group(1)
    # :class:`~a.b.C` shows C; :meth:`text <target>` shows text.
    return text.rsplit(".", 1)[-1] if " " not in text else text


def plain_description(schema: dict[str, Any]) -> None:
    """Make a JSON schema's ``description`` (taken from a docstring) plain prose.

    The docstring's first paragraph, without reStructuredText roles or literals: the
    sections after it (examples, attributes) are for the documentation site, not for
    OpenAPI readers. A ``json_schema_extra`` hook; every public model of chatkeep that
    may appear in an API schema uses it.
    """
    doc = schema.get("description")
    if isinstance(doc, str):
        summary = doc.strip().split("\n\n", 1)[0]
        summary = _DOC_ROLE.sub(_plain_role, summary).replace("``", "")
        schema["description"] = " ".join(summary.split())


SCHEMA_CONFIG: Final = ConfigDict(json_schema_extra=plain_description)
"""The pydantic config of chatkeep's dataclasses that pydantic (and FastAPI) may serialise."""


# -- canonical forms, usable without building a DTO (look-ups use them) --------------------


def canonical_email(value: str) -> str:
    """The stored form of an email address: stripped and lower-cased.

    Raises:
        InvalidInput: ``email`` breaks a rule (see the module docstring).
    """
    try:
        return _canonical_email(value)
    except PydanticCustomError as exc:
        raise InvalidInput("email", _rule_text(exc)) from None


def _canonical_email(value: str) -> str:
    if not isinstance(value, str):
        raise _rule("must be a string")
    email = value.strip().lower()
    if len(email) > EMAIL_MAX_LENGTH:
        raise _rule(f"at most {EMAIL_MAX_LENGTH} characters")
    local, at, domain = email.rpartition("@")
    if not at or not local or not domain:
        raise _rule("must look like name@example.org")
    if len(local) > EMAIL_LOCAL_MAX_LENGTH or not _EMAIL_LOCAL_RE.fullmatch(local):
        raise _rule("local part must be ASCII letters, digits or !#$%&'*+/=?^_`{|}~.-")
    labels = domain.split(".")
    if len(labels) < 2 or not all(_EMAIL_LABEL_RE.fullmatch(label) for label in labels):
        raise _rule("domain must be ASCII labels separated by dots")
    if labels[-1].isdigit():
        raise _rule("domain must not be an IP address")
    return email


def canonical_username(value: str) -> str:
    """The stored form of a username: NFKC-normalised and lower-cased.

    Raises:
        InvalidInput: ``username`` breaks a rule (see the module docstring).
    """
    try:
        return _canonical_username(value)
    except PydanticCustomError as exc:
        raise InvalidInput("username", _rule_text(exc)) from None


def _canonical_username(value: str) -> str:
    if not isinstance(value, str):
        raise _rule("must be a string")
    if len(value) > 4 * USERNAME_MAX_LENGTH:
        # Refuse huge input before normalising it (NFKC can expand a string 18-fold).
        raise _rule(f"{USERNAME_MIN_LENGTH} to {USERNAME_MAX_LENGTH} characters")
    name = unicodedata.normalize("NFKC", value.strip()).lower()
    if not USERNAME_MIN_LENGTH <= len(name) <= USERNAME_MAX_LENGTH:
        raise _rule(f"{USERNAME_MIN_LENGTH} to {USERNAME_MAX_LENGTH} characters")
    if not _USERNAME_RE.fullmatch(name):
        raise _rule("only a-z, 0-9, _ . - and starting with a letter or digit")
    return name


def check_password(value: str) -> str:
    """Return ``value`` if it is an acceptable password.

    Raises:
        InvalidInput: ``password`` is shorter than 8 characters, longer than 72 bytes in
            UTF-8 (bcrypt's limit), or contains NUL.
    """
    try:
        return _check_password(value)
    except PydanticCustomError as exc:
        raise InvalidInput("password", _rule_text(exc)) from None


def _check_password(value: str) -> str:
    if not isinstance(value, str):
        raise _rule("must be a string")
    if len(value) > PASSWORD_MAX_BYTES:  # cheap early exit; bytes >= characters
        raise _rule(f"at most {PASSWORD_MAX_BYTES} bytes in UTF-8 (bcrypt's limit)")
    _check_text(value)
    if len(value.encode("utf-8")) > PASSWORD_MAX_BYTES:
        raise _rule(f"at most {PASSWORD_MAX_BYTES} bytes in UTF-8 (bcrypt's limit)")
    if len(value) < PASSWORD_MIN_LENGTH:
        raise _rule(f"at least {PASSWORD_MIN_LENGTH} characters")
    return value


def _check_url(value: str | None) -> str | None:
    if value is None:
        return None
    if len(value) > URL_MAX_LENGTH:
        raise _rule(f"at most {URL_MAX_LENGTH} characters")
    _check_text(value)
    if any(ch.isspace() for ch in value):
        raise _rule("must not contain whitespace")
    try:
        parts = urlsplit(value)
    except ValueError:
        raise _rule("must be a valid URL") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise _rule("must be an http:// or https:// URL with a host")
    return value


def _check_content(value: str) -> str:
    if len(value) > CONTENT_MAX_LENGTH:
        raise _rule(f"at most {CONTENT_MAX_LENGTH} characters")
    _check_text(value)
    if not value.strip(_CONTENT_BLANKS):
        raise _rule("must not be empty or only whitespace")
    return value


def check_content(value: str) -> str:
    """Return ``value`` if it is acceptable message content.

    Raises:
        InvalidInput: ``content`` is empty, only whitespace, over 10000 characters, or
            contains NUL or lone surrogates.
    """
    if not isinstance(value, str):
        raise InvalidInput("content", "must be a string")
    try:
        return _check_content(value)
    except PydanticCustomError as exc:
        raise InvalidInput("content", _rule_text(exc)) from None


_EMOJI_CATEGORIES: Final = frozenset({"So", "Sk", "Mn", "Me", "Nd"})
_EMOJI_EXTRA: Final = frozenset("#*\u200d")
_KEYCAP: Final = "\u20e3"


def check_emoji(value: object) -> str:
    """``value`` if it is a reaction emoji (the ``emoji`` rule above).

    Raises:
        InvalidInput: ``emoji`` breaks the rule (``field`` is ``"emoji"``).
    """
    rule = f"an emoji: 1 to {EMOJI_MAX_BYTES} bytes of emoji characters, at least one symbol"
    if not isinstance(value, str) or not value:
        raise InvalidInput("emoji", rule)
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInput("emoji", rule) from None
    if size > EMOJI_MAX_BYTES:
        raise InvalidInput("emoji", rule)
    symbol = False
    for char in value:
        category = unicodedata.category(char)
        if category == "So" or char == _KEYCAP:
            symbol = True
        elif not (
            category in _EMOJI_CATEGORIES
            or char in _EMOJI_EXTRA
            or "\U000e0020" <= char <= "\U000e007f"  # tags (subdivision flags)
        ):
            raise InvalidInput("emoji", rule)
    if not symbol:
        raise InvalidInput("emoji", rule)
    return value


def _check_room_name(value: str) -> str:
    if len(value) > ROOM_NAME_MAX_LENGTH:
        raise _rule(f"1 to {ROOM_NAME_MAX_LENGTH} characters")
    _check_text(value)
    stripped = value.strip()
    if not stripped:
        raise _rule("must not be empty or only whitespace")
    return stripped


def _check_description(value: str | None) -> str | None:
    if value is None:
        return None
    if len(value) > ROOM_DESCRIPTION_MAX_LENGTH:
        raise _rule(f"at most {ROOM_DESCRIPTION_MAX_LENGTH} characters")
    _check_text(value)
    return value


# -- base classes ------------------------------------------------------------------------


def _password(value: Any) -> str:
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    return _check_password(value)


# The field types of the DTOs and bodies. Each rule pydantic can state is a constraint
# (so it shows in the JSON schema and is reported with every other problem); validators
# keep what it cannot: canonical forms (NFKC, case), bcrypt's limit in bytes, NUL, lone
# surrogates, "not only whitespace" and URL schemes. Constraints come before validators
# in each Annotated, so they apply to the string itself, then the validator wraps it.
Email = Annotated[
    str,
    Field(
        max_length=EMAIL_MAX_LENGTH,
        json_schema_extra={"format": "email"},
        description="An email address (ASCII); stored lower-cased.",
    ),
    BeforeValidator(_canonical_email),
]
Username = Annotated[
    str,
    Field(
        min_length=USERNAME_MIN_LENGTH,
        max_length=USERNAME_MAX_LENGTH,
        pattern=_USERNAME_PATTERN,
        description=(
            "3 to 32 letters, digits, underscores, dots or hyphens, starting with a letter "
            "or digit; stored NFKC-normalised and lower-cased."
        ),
    ),
    BeforeValidator(_canonical_username),
]
Password = Annotated[
    SecretStr,
    Field(
        min_length=PASSWORD_MIN_LENGTH,
        max_length=PASSWORD_MAX_BYTES,
        description="At least 8 characters and at most 72 bytes in UTF-8; no NUL.",
    ),
    BeforeValidator(_password),
]
AvatarUrl = Annotated[
    str,
    Field(
        max_length=URL_MAX_LENGTH,
        json_schema_extra={"format": "uri"},
        description="An http:// or https:// URL with a host.",
    ),
    AfterValidator(_check_url),
]
Content = Annotated[
    str,
    Field(
        strict=True,
        min_length=1,
        max_length=CONTENT_MAX_LENGTH,
        description="The message text: not only whitespace, no NUL; kept verbatim.",
    ),
    AfterValidator(_check_content),
]
RoomName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=ROOM_NAME_MAX_LENGTH,
        description="The room's name: not only whitespace, no NUL; stored stripped.",
    ),
    AfterValidator(_check_room_name),
]
RoomDescription = Annotated[
    str,
    Field(max_length=ROOM_DESCRIPTION_MAX_LENGTH, description="What the room is about."),
    AfterValidator(_check_description),
]
ClientMsgId = Annotated[
    str,
    Field(
        strict=True,
        min_length=1,
        max_length=CLIENT_MSG_ID_MAX_LENGTH,
        pattern=_CLIENT_MSG_ID_PATTERN,
        description=(
            "The sender's id for this message (printable ASCII, no spaces): sending again "
            "with the same id returns the first message instead of storing a copy."
        ),
    ),
]


class _Dto(BaseModel):
    """Caller input: validated on construction; pydantic's ValidationError lists every problem."""

    # hide_input_in_errors: a ValidationError's text never shows a value (maybe a password).
    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        hide_input_in_errors=True,
        json_schema_extra=plain_description,
    )

    @classmethod
    def checked(cls, **fields: Any) -> Self:
        """Build and validate, raising chatkeep's error instead of pydantic's.

        Raises:
            InvalidInput: a field breaks a rule (``errors`` lists every problem found).
        """
        try:
            return cls(**fields)
        except ValidationError as exc:
            # from None: pydantic's error would carry the input (maybe a password).
            raise invalid_input(exc) from None


_new = object.__new__
_set = object.__setattr__


class _Row:
    """A stored row: a frozen dataclass that repositories build straight from a record.

    The database already checked every value (its CHECK constraints repeat the DTO rules),
    so rows are not validated again. Built by hand, ``Row(field=...)`` runs the dataclass
    ``__init__`` (no validation either); ``TypeAdapter(Row).validate_python(...)`` or
    ``validate_json(...)`` validates.

    Row classes are dataclasses without ``__slots__`` on purpose: the fast way in is one
    store of the instance's attribute dictionary (``object.__setattr__(row, "__dict__",
    values)``; ``object.__setattr__`` is the documented way past a frozen dataclass's
    ``__setattr__``), where a slotted class needs one descriptor call per field. On a
    history page of 50 messages with authors the frozen ``__init__`` costs 3-4 times as
    much, slot descriptors about 2.5 times (``docs/performance.md``).
    """

    __slots__ = ()
    __pydantic_config__: ClassVar[ConfigDict] = SCHEMA_CONFIG
    # Declared for type checkers (``dataclasses.fields(row_class)``); every row class is a
    # dataclass, which sets it.
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    @classmethod
    def _from_row(cls, values: Mapping[str, Any] | Record) -> Self:
        """Build from trusted database values: no validation.

        ``values`` must hold exactly the class's fields (a record of a SELECT naming
        them, or a dict); nothing checks it here, the repository tests do.
        """
        return cls._adopt(dict(values))

    @classmethod
    def _adopt(cls, data: dict[str, Any]) -> Self:
        """Like :meth:`_from_row`, taking ownership of ``data`` (no copy)."""
        row = _new(cls)
        _set(row, "__dict__", data)
        return row


def _dict_setter(cls: type[_Row]) -> Callable[[Any, dict[str, Any]], None]:
    """What stores a row's ``__dict__``, called directly (for a hot loop).

    A class without ``__slots__`` carries a ``__dict__`` data descriptor for its
    instances' attribute dictionaries (Python's data model); calling its ``__set__`` does
    what ``object.__setattr__(row, "__dict__", values)`` does without looking the name up
    first, about 80 ns less per object.
    """
    for klass in cls.__mro__:
        descriptor = vars(klass).get("__dict__")
        if descriptor is not None and hasattr(descriptor, "__set__"):
            setter: Callable[[Any, dict[str, Any]], None] = descriptor.__set__
            return setter
    raise TypeError(f"{cls.__name__} instances have no __dict__")  # pragma: no cover


# -- users --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class UserProfile(_Row):
    """What other users may see of a user: no email, no timestamps of activity."""

    id: uuid.UUID
    username: str
    avatar_url: str | None = None


@dataclass(frozen=True, kw_only=True)
class User(_Row):
    """An account as its owner sees it. There is no ``password_hash`` field, by design."""

    id: uuid.UUID
    email: str
    username: str
    avatar_url: str | None = None
    is_active: bool = True
    last_seen: datetime | None = None
    created_at: datetime
    updated_at: datetime

    def profile(self) -> UserProfile:
        """The public part of this user."""
        return UserProfile._from_row(
            {"id": self.id, "username": self.username, "avatar_url": self.avatar_url}
        )


class CreateUserDto(_Dto):
    """A new account. The password never shows in reprs or dumps."""

    email: Email
    username: Username
    password: Password
    avatar_url: AvatarUrl | None = None


class UpdateUserDto(_Dto):
    """A profile change: only the fields given are changed; a null avatar_url clears it."""

    username: Username | None = None
    avatar_url: AvatarUrl | None = None

    @field_validator("username", mode="before")
    @classmethod
    def _username(cls, value: Any) -> Any:
        if value is None:
            raise _rule("must not be null (leave it out to keep the current one)")
        return value


# -- rooms --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Room(_Row):
    """A room. ``last_seq`` is the ``seq`` of its newest message (0 when empty)."""

    id: uuid.UUID
    name: str
    description: str | None = None
    type: RoomType
    created_by: uuid.UUID
    is_active: bool = True
    last_seq: int = 0
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, kw_only=True)
class RoomUser(_Row):
    """A membership, with the member's read watermark."""

    room_id: uuid.UUID
    user_id: uuid.UUID
    role: RoomRole
    joined_at: datetime
    last_read_at: datetime | None = None
    last_read_seq: int = 0


@dataclass(frozen=True, kw_only=True)
class RoomMember(_Row):
    """A member of a room as a listing shows it: profile, role and read watermark."""

    user: UserProfile
    role: RoomRole
    joined_at: datetime
    last_read_seq: int = 0
    last_read_at: datetime | None = None


@dataclass(frozen=True, kw_only=True)
class RoomWithUsers(Room):
    """A room with all of its members (oldest member first)."""

    members: tuple[RoomMember, ...] = ()


class CreateRoomBody(_Dto):
    """A new public or private room, as a client asks for it: the creator is the caller.

    ``body.by(user_id)`` gives the :class:`CreateRoomDto` to create it with.
    """

    name: RoomName
    description: RoomDescription | None = None
    type: Literal["public", "private"] = "public"

    def by(self, created_by: uuid.UUID) -> CreateRoomDto:
        """The room to create, made by ``created_by`` (who becomes its owner).

        Raises:
            InvalidInput: ``created_by`` is not a UUID.
        """
        return CreateRoomDto.checked(**self.model_dump(), created_by=created_by)


class CreateRoomDto(_Dto):
    """A new public or private room; direct rooms are opened per pair of users instead."""

    name: RoomName
    description: RoomDescription | None = None
    type: Literal["public", "private"] = "public"
    created_by: uuid.UUID = Field(description="The creator, who becomes the room's owner.")


class UpdateRoomDto(_Dto):
    """A change of name or description: only the fields given are changed."""

    name: RoomName | None = None
    description: RoomDescription | None = None

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, value: Any) -> Any:
        if value is None:
            raise _rule("must not be null (leave it out to keep the current one)")
        return value


# -- messages -----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Message(_Row):
    """A stored message; ``seq`` is its gapless, commit-ordered position in the room."""

    id: uuid.UUID
    room_id: uuid.UUID
    user_id: uuid.UUID
    seq: int
    client_msg_id: str | None = None
    content: str
    type: MessageType = "text"
    is_edited: bool = False
    edited_at: datetime | None = None
    created_at: datetime
    #: The root of the thread this message replies to (same room), or ``None``.
    reply_to: uuid.UUID | None = None


@dataclass(frozen=True, kw_only=True)
class ReactionCount(_Row):
    """How many members reacted to a message with ``emoji``, and whether the reader did."""

    emoji: str
    count: int
    me: bool = False


@dataclass(frozen=True, kw_only=True)
class ThreadSummary(_Row):
    """A thread's summary, kept by the database as replies come and go.

    ``participants`` holds the first ten repliers, in the order they first replied.
    """

    root_id: uuid.UUID
    room_id: uuid.UUID
    root_seq: int
    reply_count: int
    last_reply_seq: int
    last_reply_at: datetime
    participants: tuple[uuid.UUID, ...] = ()


@dataclass(frozen=True, kw_only=True)
class MessageWithUser(Message):
    """A message with its author's public profile, as history pages return it.

    ``reactions`` holds its reaction counts, one per emoji, in the order each emoji was
    first used on it (empty when nobody reacted).
    """

    user: UserProfile
    reactions: tuple[ReactionCount, ...] = ()
    #: The thread's summary, on a root in a collapsed history page
    #: (:meth:`chatkeep.ChatKeep.collapsed_history`); ``None`` everywhere else.
    thread: ThreadSummary | None = None


class CreateMessageDto(_Dto):
    """A message to send; a client_msg_id makes the send idempotent."""

    room_id: uuid.UUID
    user_id: uuid.UUID
    content: Content
    type: MessageType = "text"
    client_msg_id: ClientMsgId | None = None
    reply_to: uuid.UUID | None = Field(
        default=None, description="The message this one replies to (its thread's root)."
    )


class SendMessageBody(_Dto):
    """A message as a client sends it: the room and the sender come from the request."""

    content: Content
    # "system" messages are the server's to write, not a client's.
    type: Literal["text", "image", "file"] = "text"
    client_msg_id: ClientMsgId | None = None


class EditMessageBody(_Dto):
    """The new content of a message, as its author sends it."""

    content: Content


@dataclass(frozen=True, kw_only=True)
class MessageReadStatus(_Row):
    """Who has read a message and when: from an explicit receipt or from their watermark."""

    message_id: uuid.UUID
    user_id: uuid.UUID
    read_at: datetime | None = None


@dataclass(frozen=True, kw_only=True)
class RoomSummary(_Row):
    """One room of a user's room list: the room, their role, the last message, unread count."""

    room: Room
    role: RoomRole
    last_read_seq: int
    unread_count: int
    last_message: MessageWithUser | None = None


# -- threads, mentions, badges ------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class FollowedThread(_Row):
    """A thread a user follows, with their read state in it.

    ``unread`` counts the replies after their watermark, capped at
    :data:`chatkeep.storage.threads.UNREAD_CAP` (a badge shows "99+", not an exact
    count over a huge thread); ``mentions`` counts their unread mentions in it.
    """

    thread: ThreadSummary
    last_read_seq: int
    unread: int
    mentions: int


@dataclass(frozen=True, kw_only=True)
class Mention(_Row):
    """A message that mentions a user (``room_wide``: through ``@room``/``@here``/``@all``)."""

    message_id: uuid.UUID
    room_id: uuid.UUID
    seq: int
    root_id: uuid.UUID | None = None
    author_id: uuid.UUID
    room_wide: bool = False


@dataclass(frozen=True, kw_only=True)
class RoomBadges(_Row):
    """What a client badges a room with: all counted after the user's watermarks.

    Attributes:
        unread: messages after the room watermark (replies included: they are messages of
            the room).
        mentions: those that mention the user, or the room (by someone else).
        unread_threads: followed threads with replies after the thread watermark.
        thread_mentions: mentions of the user in followed threads after its watermark.
    """

    room_id: uuid.UUID
    unread: int
    mentions: int
    unread_threads: int
    thread_mentions: int


# -- pages --------------------------------------------------------------------------------

T = TypeVar("T")


# Not slotted, like the rows: on Python 3.11 a frozen slotted dataclass breaks
# ``CursorPage[T](...)`` (its ``__setattr__`` refers to the class that slots=True replaced).
@dataclass(frozen=True, kw_only=True)
class CursorPage(Generic[T]):
    """A page of items in ascending order, with opaque cursors to the pages around it.

    ``before`` fetches the page just older than the first item and is ``None`` when there
    is nothing older; ``after`` fetches the page just newer than the last item and is
    ``None`` when there was nothing newer when this page was read (``newest`` gives the
    cursor to poll for new items from there).
    """

    __pydantic_config__: ClassVar[ConfigDict] = SCHEMA_CONFIG

    items: tuple[T, ...]
    before: str | None = None
    after: str | None = None
    newest: str | None = None


# -- search -------------------------------------------------------------------------------

#: Marks the start of a matched term in :attr:`SearchHit.snippet` (U+E000, private use).
SNIPPET_START: Final = "\ue000"
#: Marks the end of a matched term in :attr:`SearchHit.snippet` (U+E001, private use).
SNIPPET_STOP: Final = "\ue001"


@dataclass(frozen=True, kw_only=True)
class SearchHit(Message):
    """A message that matched a search, with its highlighted snippet.

    ``snippet`` is an extract of ``content`` (up to about 35 words) with each matched term
    between :data:`SNIPPET_START` and :data:`SNIPPET_STOP`: two private-use characters,
    removed from the content before the snippet is made, so they only ever mark matches.
    The snippet is plain text: escape it for HTML as you would the content, then turn the
    markers into ``<mark>`` tags. ``rank`` is the ``ts_rank`` score when the search was
    ordered by rank, else ``None``.
    """

    snippet: str
    rank: float | None = None


@dataclass(frozen=True, kw_only=True)
class SearchPage(_Row):
    """A page of search results, best (or newest) first.

    ``next`` is the opaque cursor of the following page, ``None`` when this page is the
    last; it only continues the same search (same query, filters and order).
    """

    items: tuple[SearchHit, ...]
    next: str | None = None


ChangeKind = Literal[
    "message.created",
    "message.edited",
    "message.deleted",
    "reaction.added",
    "reaction.removed",
    "member.joined",
    "member.left",
    "member.removed",
    "member.role_changed",
    "room.updated",
    "room.deleted",
]
CHANGE_KINDS: Final[frozenset[str]] = frozenset(get_args(ChangeKind))


@dataclass(frozen=True, kw_only=True)
class Change(_Row):
    """One entry of a room's change log (``docs/design.md``, "The room change log").

    ``position`` is the room's version the change made (gapless and in commit order per
    room); ``seq`` is the message's own number, for message and reaction kinds. ``data``
    carries the resulting state, never a delta, so applying a change twice is harmless:

    ==================== ==============================================================
    message.created      ``content``, ``type``, ``client_msg_id``, ``is_edited``,
    message.edited       ``edited_at``, ``created_at``, ``user_id``, ``reply_to``,
                         ``mentions``, ``mentions_room`` (the message as it is now: an
                         edit made later shows in both; ``reply_to`` is its thread's
                         root or ``None``; ``mentions`` the mentioned members' ids,
                         sorted, members only; ``mentions_room`` an @room by an owner
                         or admin)
    message.deleted      nothing: the content is gone (a tombstone)
    reaction.added       ``user_id``, ``emoji``, ``count`` (the emoji's count on the
    reaction.removed     message after the change)
    member.*             ``user_id``, ``role``
    room.updated         ``name``, ``description``, ``type``, ``is_active``
    ==================== ==============================================================
    """

    room_id: uuid.UUID
    position: int
    kind: ChangeKind
    occurred_at: datetime
    actor_id: uuid.UUID | None = None
    message_id: uuid.UUID | None = None
    seq: int | None = None
    data: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class ChangePage:
    """A page of a room's changes in ascending position.

    ``position`` is the room's position when the page was read; ``next_after`` is the
    ``after=`` of the next page, ``None`` when this page reached ``position``.
    """

    room_id: uuid.UUID
    items: list[Change]
    position: int
    next_after: int | None = None


class UnreadCounts(Mapping[uuid.UUID, int]):
    """Unread messages per room for one user: a read-only mapping of room id to count.

    It wraps the query's rows as they are. The hash index behind ``counts[room_id]`` is
    built on the first look-up: hashing a freshly decoded UUID costs about 0.3 us (1-2 us
    on a loaded machine), a noticeable share of the whole call for a user in hundreds of
    rooms, and iterating, ``len``, ``items()`` or ``values()`` never need it.

    Pydantic (and so FastAPI) takes it as a field or return type through the public
    ``__get_pydantic_core_schema__`` hook: it serialises as a ``dict[UUID, int]`` (a JSON
    object of room id to count) and validates from one.

    Read by :meth:`chatkeep.ChatKeep.unread_counts` it also carries each room's badge
    (mentions, unread threads, thread mentions; the same statement as
    :meth:`chatkeep.ChatKeep.badges`, migration 020): :meth:`badge` and :meth:`badges`.
    Counts built from ``(room_id, count)`` pairs (a repository call inside a transaction
    of your own, Citus mode) have none: :meth:`badge` returns ``None``.

    Example:
        >>> room = uuid.UUID(int=1)
        >>> counts = UnreadCounts([(room, 3)])
        >>> counts[room], dict(counts) == {room: 3}, len(counts)
        (3, True, 1)
    """

    __slots__ = ("_index", "_pairs", "_rows")

    def __init__(self, pairs: Sequence[Any] = ()) -> None:
        # Each element is (room_id, count, ...): a tuple or an asyncpg Record, with the
        # badge columns (mentions, unread_threads, thread_mentions) after the count when
        # the statement read them.
        self._pairs = pairs
        self._index: dict[uuid.UUID, int] | None = None
        self._rows: dict[uuid.UUID, Any] | None = None

    def _lookup(self) -> dict[uuid.UUID, int]:
        index = self._index
        if index is None:
            index = self._index = {row[0]: row[1] for row in self._pairs}
        return index

    @property
    def has_badges(self) -> bool:
        """Whether the rows carry the badge columns (see :meth:`badge`)."""
        pairs = self._pairs
        return bool(pairs) and len(pairs[0]) >= _BADGE_WIDTH

    def badge(self, room_id: uuid.UUID) -> RoomBadges | None:
        """The room's :class:`RoomBadges`, or ``None`` when these counts carry no badges.

        Raises:
            KeyError: ``room_id`` is not one of the user's rooms.
        """
        rows = self._rows
        if rows is None:
            rows = self._rows = {row[0]: row for row in self._pairs}
        row = rows[room_id]
        if len(row) < _BADGE_WIDTH:
            return None
        return _badge(row)

    def badges(self) -> dict[uuid.UUID, RoomBadges]:
        """Every room's :class:`RoomBadges` (empty when these counts carry no badges)."""
        if not self.has_badges:
            return {}
        return {row[0]: _badge(row) for row in self._pairs}

    def __getitem__(self, room_id: uuid.UUID) -> int:
        return self._lookup()[room_id]

    def __contains__(self, room_id: object) -> bool:
        return room_id in self._lookup()

    def __iter__(self) -> Iterator[uuid.UUID]:
        return (row[0] for row in self._pairs)

    def __len__(self) -> int:
        return len(self._pairs)

    def items(self) -> ItemsView[uuid.UUID, int]:
        """``(room_id, count)`` pairs, straight from the rows (no index needed)."""
        return _PairItems(self)

    def values(self) -> ValuesView[int]:
        """The counts, straight from the rows."""
        return _PairValues(self)

    def total(self) -> int:
        """Unread messages over all rooms."""
        return sum(row[1] for row in self._pairs)

    def __repr__(self) -> str:
        return f"UnreadCounts({dict(self.items())!r})"

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        # The pattern pydantic documents for third-party types: from a mapping when
        # validating, to a dict when serialising, an instance passes as it is.
        as_dict = handler.generate_schema(dict[uuid.UUID, int])
        from_dict = core_schema.no_info_after_validator_function(_unread_from_dict, as_dict)
        return core_schema.json_or_python_schema(
            json_schema=from_dict,
            python_schema=core_schema.union_schema(
                [core_schema.is_instance_schema(cls), from_dict]
            ),
            serialization=core_schema.plain_serializer_function_ser_schema(
                _unread_to_dict, return_schema=as_dict
            ),
        )


# room_id, unread, mentions, unread_threads, thread_mentions (chatkeep_unread, 020).
_BADGE_WIDTH: Final = 5


def _badge(row: Any) -> RoomBadges:
    return RoomBadges._adopt(
        {
            "room_id": row[0],
            "unread": row[1],
            "mentions": row[2],
            "unread_threads": row[3],
            "thread_mentions": row[4],
        }
    )


def _unread_from_dict(counts: dict[uuid.UUID, int]) -> UnreadCounts:
    return UnreadCounts(tuple(counts.items()))


def _unread_to_dict(counts: UnreadCounts) -> dict[uuid.UUID, int]:
    return dict(counts.items())


class _PairItems(ItemsView[uuid.UUID, int]):
    _mapping: UnreadCounts

    def __iter__(self) -> Iterator[tuple[uuid.UUID, int]]:
        return ((row[0], row[1]) for row in self._mapping._pairs)


class _PairValues(ValuesView[int]):
    _mapping: UnreadCounts

    def __iter__(self) -> Iterator[int]:
        return (row[1] for row in self._mapping._pairs)
