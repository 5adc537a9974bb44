"""The facade: one object over both stores, and the flows that span them.

::

    async with ChatKeep.connect(settings) as chat:
        user = await chat.register(CreateUserDto(...))
        message = await chat.send_message(room_id, user.id, "hello", client_msg_id="c-1")
        page = await chat.catch_up(room_id, user.id, after_seq=41)

Each flow lives here once, in this order: validate the input, rate-limit, write
PostgreSQL (the truth, committed first), then do the Redis work (invalidate caches,
publish events) after the commit, best-effort. If Redis is down, writes still succeed: the
send limit fails open, events are not published and caches are not invalidated (a
warning is logged; cached entries age out with their TTL). Nor do writes wait for a Redis
that is down, frozen or unreachable: the send limit check, and the Redis work after the
commit, each get ``Settings.redis_best_effort_timeout`` (0.5 s by default) in all, and
the flow goes on without them past it (docs/troubleshooting.md lists every flow's bound).
Subscribers learn of missed events through a :class:`~chatkeep.realtime.RoomGap` and catch
up from PostgreSQL with :meth:`ChatKeep.catch_up`, by ``seq``.

Two flows are stricter, because a security decision depends on Redis: revoking the
sessions of a deactivated account or after a password change raises
:class:`~chatkeep.errors.Unavailable` when Redis is down (the PostgreSQL change is kept;
calling the flow again, which is idempotent, finishes the revocation).

Every flow made on behalf of a user runs its PostgreSQL work in one transaction *acting as*
that user (:meth:`Database.acting_as`), so row security confines it to what the user may
see and write, even when the database role is the least-privileged ``chatapp_app``. For
reads of your own, ``async with chat.acting_as(user_id):`` does the same around repository
calls.

Write through these methods, not through the repositories' own (``chat.rooms``,
``chat.users``...): those touch PostgreSQL only, so they neither invalidate caches nor
publish events.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import socket
import time
import uuid
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, ClassVar, Final, Literal, Self, TypeVar

from pydantic import ConfigDict

from chatkeep.config import Settings
from chatkeep.embedded import resolve_endpoints
from chatkeep.errors import (
    ChatkeepError,
    InvalidInput,
    NotFound,
    PermissionDenied,
    RateLimited,
    Unavailable,
)
from chatkeep.groupcommit import PendingSend, SendBatcher
from chatkeep.models import (
    SCHEMA_CONFIG,
    ChangePage,
    CreateMessageDto,
    CreateRoomDto,
    CreateUserDto,
    CursorPage,
    FollowedThread,
    Mention,
    Message,
    MessageType,
    MessageWithUser,
    Room,
    RoomBadges,
    RoomRole,
    RoomSummary,
    RoomUser,
    SearchPage,
    ThreadSummary,
    UnreadCounts,
    UpdateUserDto,
    User,
    UserProfile,
    canonical_email,
)
from chatkeep.ops import tracing
from chatkeep.realtime import (
    Event,
    EventBus,
    EventSubscription,
    IssuedRefreshToken,
    IssuedSession,
    JsonSerializer,
    LoginThrottle,
    MemberJoined,
    MemberLeft,
    MemberRoleChanged,
    MessageCreated,
    MessageDeleted,
    MessageEdited,
    MessageRoomCache,
    MessagesRead,
    OfflineUser,
    Presence,
    PresenceChanged,
    RateLimit,
    RateLimiter,
    ReactionAdded,
    ReactionRemoved,
    RedisClient,
    RedisHealth,
    RefreshTokenStore,
    RoomGap,
    RoomMembersCache,
    SessionStore,
    SocketRegistry,
    TypingChanged,
    TypingIndicators,
    Unshared,
    UserProfileCache,
)
from chatkeep.realtime.keys import MAX_ID_LENGTH
from chatkeep.relay import OutboxRelay
from chatkeep.storage import Database, MessageRepository, RoomRepository, UserRepository
from chatkeep.storage.base import check_id
from chatkeep.storage.bootstrap import bootstrap
from chatkeep.storage.changes import DEFAULT_CHANGES_LIMIT, ChangeRepository
from chatkeep.storage.database import DatabaseHealth, IsolationLevel, Transaction
from chatkeep.storage.messages import DEFAULT_PAGE_SIZE, SendResult, decode_cursor
from chatkeep.storage.migrate import migrate_up
from chatkeep.storage.reactions import ReactionRepository
from chatkeep.storage.search import DEFAULT_SEARCH_LIMIT, SearchOrder, SearchRepository
from chatkeep.storage.threads import DEFAULT_LIST_SIZE, ThreadRepository
from chatkeep.storage.users import DEFAULT_BCRYPT_ROUNDS
from chatkeep.stream import ChangeStream

if TYPE_CHECKING:  # the metrics (prometheus-client) and otel extras are optional
    from opentelemetry.trace import Span

    from chatkeep.ops.metrics import ChatkeepMetrics

__all__ = ["DEFAULT_SEND_LIMIT", "ChatKeep", "Health", "LoginResult"]

_T = TypeVar("_T")

# Users whose last write time _wrote keeps before it forgets those older than the lag bound.
_RECENT_WRITES_KEPT: Final = 10_000

logger = logging.getLogger("chatkeep.facade")

DEFAULT_SEND_LIMIT: Final = RateLimit(limit=30, period=10.0, burst=20)
"""Messages a user may send: 30 per 10 seconds, bursts of 20."""


@dataclass(frozen=True, slots=True)
class LoginResult:
    """A successful login (or refresh): the user, a session token and a refresh token.

    The session and the refresh token's family are one login: the family records every
    session it mints, and revoking the family (logout, or the reuse of a spent refresh
    token) ends them all.
    """

    __pydantic_config__: ClassVar[ConfigDict] = SCHEMA_CONFIG  # plain schema text

    user: User
    session: IssuedSession
    refresh: IssuedRefreshToken


@dataclass(frozen=True, slots=True)
class Health:
    """Both stores' health in one value."""

    __pydantic_config__: ClassVar[ConfigDict] = SCHEMA_CONFIG  # plain schema text

    database: DatabaseHealth
    redis: RedisHealth

    @property
    def ok(self) -> bool:
        """Both stores answered (a database that did not answer raises instead)."""
        return self.redis.ok


def _login_account(email: str) -> str:
    """The login throttle's account name for ``email`` (canonical form, validated).

    Valid addresses may hold braces or run to 254 characters, which key names refuse;
    those are throttled under a digest instead.
    """
    account = canonical_email(email)
    if len(account) <= MAX_ID_LENGTH and "{" not in account and "}" not in account:
        return account
    return "sha256:" + hashlib.sha256(account.encode("ascii")).hexdigest()


def _ids(field: str, values: object) -> frozenset[uuid.UUID]:
    # A lone id (or its string) is refused rather than iterated character by character.
    if isinstance(values, str | bytes | uuid.UUID) or not isinstance(values, Iterable):
        raise InvalidInput(field, "must be a collection of UUIDs")
    return frozenset(check_id(field, value) for value in values)


ROOM_NOT_FOUND: Final = "room not found"
"""What every flow answers about a room its user cannot see, whether it exists or not."""
MESSAGE_NOT_FOUND: Final = "message not found"
"""The same for a message (in a room its user cannot see, or none at all)."""

_RECENT_CHANGE_PAGES: Final = 1024
"""Finished change-log reads a facade keeps for streams that resume at the same place."""

_RECENT_CHANGE_SECONDS: Final = 2.0
"""How long a finished read may be reused (while the published mark allows it)."""


@contextlib.contextmanager
def _hidden(entity: str, message: str) -> Iterator[None]:
    """Answer ``NotFound(message)`` for any missing or invisible ``entity`` in the block.

    Row security already makes a private room the user is not in look absent; this makes
    the text the same too, so a room id tells an outsider nothing (the repositories name
    the id, which differs between a real room and a made-up one).
    """
    try:
        yield
    except NotFound as exc:
        if exc.entity != entity:
            raise
        raise NotFound(message, entity=entity) from exc


@contextlib.contextmanager
def _reply_errors() -> Iterator[None]:
    """Name ``reply_to`` in the errors of a reply's checks (trigger ``messages_thread_root``)."""
    try:
        yield
    except NotFound as exc:
        if "messages_reply_to_fkey" not in str(exc):
            raise
        raise NotFound(f"reply_to: {MESSAGE_NOT_FOUND}", entity="message") from exc
    except InvalidInput as exc:
        if exc.field != "reply_to":
            raise
        raise InvalidInput("reply_to", "must be a message of the same room") from exc


def _hidden_room() -> contextlib.AbstractContextManager[None]:
    return _hidden("room", ROOM_NOT_FOUND)


def _receipt_counter(metrics: ChatkeepMetrics) -> Callable[[Event | RoomGap], None]:
    """Count what subscriptions hand out: events as received, gaps by reason."""

    def count(item: Event | RoomGap) -> None:
        if isinstance(item, RoomGap):
            metrics.gap(item.reason)
        else:
            metrics.received()

    return count


def _log_failure(task: asyncio.Task[None]) -> None:
    """Log why a background task stopped (cancellation is the normal end)."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        logger.error("%s stopped: %s", task.get_name(), exc, exc_info=exc)


class _StreamSource:
    """What one :class:`~chatkeep.stream.ChangeStream` reads: the facade, reads shared.

    It notes when the stream's subscription was confirmed, so that the stream only
    shares reads that started after it (see :meth:`ChatKeep._shared_changes`).
    """

    __slots__ = ("_chat", "_subscribed")

    def __init__(self, chat: ChatKeep) -> None:
        self._chat = chat
        self._subscribed = float("inf")

    async def changes(
        self, room_id: uuid.UUID, user_id: uuid.UUID, *, after: int, limit: int = 100
    ) -> ChangePage:
        return await self._chat._shared_changes(
            room_id, user_id, after=after, limit=limit, not_before=self._subscribed
        )

    async def room_position(self, room_id: uuid.UUID, user_id: uuid.UUID) -> int:
        return await self._chat.room_position(room_id, user_id)

    async def subscribe(self, *room_ids: uuid.UUID) -> EventSubscription:
        subscription = await self._chat.subscribe(*room_ids)
        self._subscribed = asyncio.get_running_loop().time()
        return subscription


class _Flow:
    """One call of a facade flow: its transaction, and the Redis work after its commit.

    Every flow has the same shape (:meth:`ChatKeep._flow`): refuse to run inside the
    caller's transaction, count its errors, do its PostgreSQL work in one transaction
    acting as its user (:meth:`acting_as`), and only after the commit, within one
    best-effort budget, invalidate caches and publish the events it queued here. Work
    queued in a flow that raises is dropped: nothing is announced that was rolled back.
    """

    __slots__ = (
        "_chat",
        "_cleanups",
        "_events",
        "_left_rooms",
        "_member_rooms",
        "_one_round_trip",
        "_profiles",
        "_user_named",
        "name",
        "span",
        "writes",
    )

    def __init__(
        self, chat: ChatKeep, name: str, span: Span | None = None, *, writes: bool = True
    ) -> None:
        self._chat = chat
        self.name = name
        #: Whether the flow may write: the users it acts as are then remembered as recent
        #: writers, whose next reads a replica may serve only once it has their write.
        self.writes = writes
        #: The flow's span (``chatkeep.<name>``), or ``None`` when not tracing.
        self.span = span
        self._user_named = False
        self._events: list[Event] = []
        self._member_rooms: list[uuid.UUID] = []
        self._profiles: list[uuid.UUID] = []
        self._cleanups: list[tuple[str, Callable[[], Awaitable[object]]]] = []
        # (room, user) whose presence and typing indicator go (a leave), in the pipeline.
        self._left_rooms: list[tuple[uuid.UUID, uuid.UUID]] = []
        # Whether the member invalidations, room clean-ups and events travel in one
        # pipeline (see one_round_trip).
        self._one_round_trip = False

    @contextlib.asynccontextmanager
    async def acting_as(
        self,
        user: uuid.UUID | None,
        *,
        hide: Literal["room", "message"] | None = None,
        isolation: IsolationLevel | None = None,
    ) -> AsyncIterator[Transaction]:
        """The flow's transaction, acting as ``user`` (``None``: system work, no user).

        ``hide`` answers a missing or invisible room (or message) with the same
        ``NotFound`` text whatever the id (see :data:`ROOM_NOT_FOUND`).
        """
        hiding = (
            _hidden(hide, ROOM_NOT_FOUND if hide == "room" else MESSAGE_NOT_FOUND)
            if hide is not None
            else contextlib.nullcontext()
        )
        if not self._user_named:  # the flow's own user, else the one it acts as
            self.about(user_id=user)
        with hiding:
            try:
                async with self._chat._as_actor_or_system(
                    user, f"facade.{self.name}", isolation=isolation
                ) as tx:
                    yield tx
            finally:
                # Even when the block failed: a COMMIT whose answer was lost may have
                # committed. Remembering a write that did not happen only costs a read
                # on the primary.
                if self.writes and user is not None:
                    self._chat._wrote(user, self)

    async def read_as(
        self, user: uuid.UUID, work: Callable[[], Awaitable[_T]], *, one_statement: bool = False
    ) -> _T:
        """Run the read ``work`` acting as ``user``, on a replica when one may serve it.

        See :meth:`chatkeep.storage.Database.read_as`; a replica is used only once it has
        ``user``'s own last write (read-your-writes, ``docs/design.md``).
        ``one_statement``: ``work`` acts as the user by itself, in one round trip
        (``as_user=``), so no transaction is opened around it.
        """
        if not self._user_named:
            self.about(user_id=user)
        return await self._chat._read_as(
            user, f"facade.{self.name}", work, one_statement=one_statement
        )

    def as_user(
        self, user: uuid.UUID, *, hide: Literal["room", "message"] | None = None
    ) -> contextlib.AbstractContextManager[None]:
        """The flow's one statement, run as ``user`` in one round trip: no transaction.

        For ``as_user=`` of the repositories (:meth:`Database.fetch_as`); ``hide`` as for
        :meth:`acting_as`.
        """
        if not self._user_named:
            self.about(user_id=user)
        if hide is None:
            return contextlib.nullcontext()
        return _hidden(hide, ROOM_NOT_FOUND if hide == "room" else MESSAGE_NOT_FOUND)

    @contextlib.contextmanager
    def writing_as(
        self, user: uuid.UUID, *, hide: Literal["room", "message"] | None = None
    ) -> Iterator[None]:
        """The flow's one writing statement, run as ``user`` in one round trip.

        :meth:`as_user` for a write (migration 018's flow functions): the same hiding,
        and the same read-your-writes mark as :meth:`acting_as` leaves, even when the
        statement failed (its commit may have happened all the same).
        """
        try:
            with self.as_user(user, hide=hide):
                yield
        finally:
            if self.writes:
                self._chat._wrote(user, self)

    def about(self, *, room_id: uuid.UUID | None = None, user_id: uuid.UUID | None = None) -> None:
        """Name the room and user the flow is about, on its span (checked ids only)."""
        if user_id is not None:
            self._user_named = True
        tracing.describe(self.span, room_id=room_id, user_id=user_id)

    def publish(self, *events: Event) -> None:
        """Publish ``events`` after the commit."""
        self._events.extend(events)

    def invalidate_members(self, *room_ids: uuid.UUID) -> None:
        """Drop the cached member lists of ``room_ids`` after the commit."""
        self._member_rooms.extend(room_ids)

    def invalidate_profile(self, user_id: uuid.UUID) -> None:
        """Drop the cached profile of ``user_id`` after the commit."""
        self._profiles.append(user_id)

    def clean_up(self, operation: str, work: Callable[[], Awaitable[object]]) -> None:
        """Run ``work`` (Redis-only state) after the commit; its failure is only logged."""
        self._cleanups.append((operation, work))

    def left_room(self, room_id: uuid.UUID, user_id: uuid.UUID) -> None:
        """Drop ``user_id``'s presence and typing indicator in ``room_id`` after the commit."""
        self._left_rooms.append((room_id, user_id))

    def one_round_trip(self) -> None:
        """Send the member invalidations, :meth:`left_room` clean-ups and events together.

        One Redis pipeline after the commit, so one round trip on a single server (on a
        cluster, one per node: the keys of one room share a slot). Other queued clean-ups
        (the replica fence) still run on their own, before it.
        """
        self._one_round_trip = True

    async def after_commit(self) -> None:
        """Do the queued Redis work, invalidations first, within the best-effort budget."""
        rooms, profiles, cleanups, events, left = (
            self._member_rooms,
            self._profiles,
            self._cleanups,
            self._events,
            self._left_rooms,
        )
        if not (rooms or profiles or cleanups or events or left):
            return
        # Taken, so that a flow that finishes early (before a required step) does not
        # repeat it when the block ends.
        self._member_rooms, self._profiles, self._cleanups, self._events = [], [], [], []
        self._left_rooms = []
        chat = self._chat
        async with chat._best_effort(f"{self.name}'s cache invalidation and publish"):
            if self._one_round_trip:
                # The fence (if any) before the events, as below; then one pipeline.
                for operation, work in cleanups:
                    await chat._quietly(operation, work())
                await chat._after_commit_together(self.name, rooms, left, events)
                for user_id in profiles:
                    await chat._invalidate_profile(user_id)
                return
            await chat._invalidate_members(*rooms)
            for room_id, user_id in left:
                await chat._quietly(
                    "presence.leave_room", chat.presence.leave_room(room_id, user_id)
                )
                await chat._quietly("typing.stop", chat.typing.stop(room_id, user_id))
            for user_id in profiles:
                await chat._invalidate_profile(user_id)
            for operation, work in cleanups:
                await chat._quietly(operation, work())
            await chat._publish(*events)


class ChatKeep:
    """Both stores, their repositories and realtime services, and the flows that span them.

    Build it with :meth:`connect` (or hand an open :class:`Database` and
    :class:`RedisClient` to the constructor; they stay the caller's to close). Ids may be
    given as :class:`uuid.UUID` or as their string form.

    Args:
        db: an open PostgreSQL pool.
        redis: a Redis client.
        node_id: this process's name in socket mappings and events (default: host name).
        send_limit: the rate limit of :meth:`send_message` per user.
        presence_timeout: seconds without a heartbeat before a user is offline.
        typing_ttl: seconds a typing indicator lasts without being renewed.
        bcrypt_rounds: the bcrypt cost of new password hashes (10 to 31).
        metrics: a :class:`~chatkeep.ops.metrics.ChatkeepMetrics` to feed: it is attached
            to ``db`` and ``redis`` and hooked into their pool acquires and commands, and
            counts this object's publishes, received events, gaps, rate-limit rejections
            and errors (``None``: nothing is measured and nothing is hooked).

    Attributes:
        db: the PostgreSQL pool.
        users, rooms, messages: the repositories (PostgreSQL only; their writes neither
            invalidate caches nor publish events).
        redis: the Redis client.
        sessions, tokens, presence, typing, sockets, events, limiter, login_throttle:
            the realtime services (Redis only).
        best_effort_timeout: seconds a write gives the Redis work it can do without
            (``db.settings.redis_best_effort_timeout``).
        profiles, members: the caches of user profiles and room membership.
        node_id: this node's name.
        metrics: the metrics being fed, or ``None``.

    Raises:
        InvalidInput: an option is out of range or ``node_id`` is not a valid id.
    """

    def __init__(
        self,
        db: Database,
        redis: RedisClient,
        *,
        node_id: str | None = None,
        send_limit: RateLimit = DEFAULT_SEND_LIMIT,
        presence_timeout: float = 60.0,
        typing_ttl: float = 5.0,
        bcrypt_rounds: int = DEFAULT_BCRYPT_ROUNDS,
        metrics: ChatkeepMetrics | None = None,
    ) -> None:
        if not isinstance(send_limit, RateLimit):
            raise InvalidInput("send_limit", "must be a RateLimit")
        self.db = db
        self.redis = redis
        self.node_id = node_id if node_id is not None else socket.gethostname()[:100] or "node"
        self.users = UserRepository(db, bcrypt_rounds=bcrypt_rounds)
        self.rooms = RoomRepository(db)
        self.messages = MessageRepository(db)
        self.search_index = SearchRepository(db)
        self.reactions = ReactionRepository(db)
        self.change_log = ChangeRepository(db)
        # Citus: the rooms of message ids, so a thread call reads one shard, not all
        # (ThreadRepository.root_of); plain PostgreSQL finds a message by its key anyway.
        self.message_rooms = MessageRoomCache(redis, timeout=db.settings.redis_best_effort_timeout)
        self.threads = ThreadRepository(db, hints=self.message_rooms if db.settings.citus else None)
        self.sessions = SessionStore(redis)
        self.tokens = RefreshTokenStore(redis)
        self.sockets = SocketRegistry(redis, node_id=self.node_id)
        self.presence = Presence(
            redis, self.sockets, timeout=presence_timeout, on_offline=self._went_offline
        )
        self.typing = TypingIndicators(redis, ttl=typing_ttl)
        self.events = EventBus(redis, node_id=self.node_id)
        self.limiter = RateLimiter(redis, {"send": send_limit})
        self.login_throttle = LoginThrottle(redis)
        self.profiles: UserProfileCache[UserProfile] = UserProfileCache(
            redis, self._load_profile, JsonSerializer(UserProfile)
        )
        self.members = RoomMembersCache(
            redis, self._load_members, lease_ttl=db.settings.member_cache_lease_ttl
        )
        self.metrics = metrics
        # The relay :meth:`run_relay` runs, once started (for tests and metrics).
        self.relay: OutboxRelay | None = None
        # Reads of the change log in flight, shared by identical concurrent stream reads.
        self._change_reads: dict[
            tuple[uuid.UUID, int, int], tuple[float, asyncio.Future[ChangePage]]
        ] = {}
        # Reads of the change log that just finished (when, page), reused by a stream that
        # subscribed after them while the room's published mark shows nothing newer.
        self._recent_changes: collections.OrderedDict[
            tuple[uuid.UUID, int, int], tuple[float, ChangePage]
        ] = collections.OrderedDict()
        # What a write gives Redis work it can do without (see _best_effort).
        self.best_effort_timeout = db.settings.redis_best_effort_timeout
        # Group commit of send_message (see chatkeep.groupcommit); None: each send alone.
        settings = db.settings
        self.send_batcher: SendBatcher | None = (
            SendBatcher(
                self._write_sends,
                size=settings.send_batch_size,
                window=settings.send_batch_window,
                in_flight=settings.send_batches_in_flight,
            )
            if settings.send_group_commit
            else None
        )
        # Read-your-writes with replicas: when each user's last write through this object
        # finished (time.monotonic(), after its COMMIT returned). See _read_as.
        self._recent_writes: dict[uuid.UUID, float] = {}
        # This object's mark on a user's recent_write key in Redis (see _mark_recent_write).
        self._fence_token = uuid.uuid4().hex.encode()
        if metrics is not None:
            metrics.attach(database=db, redis=redis)  # hooks the pool and the client too
            self.events.on_receive = _receipt_counter(metrics)

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls,
        settings: Settings | None = None,
        *,
        node_id: str | None = None,
        send_limit: RateLimit = DEFAULT_SEND_LIMIT,
        presence_timeout: float = 60.0,
        typing_ttl: float = 5.0,
        bcrypt_rounds: int = DEFAULT_BCRYPT_ROUNDS,
        metrics: ChatkeepMetrics | None = None,
    ) -> AsyncIterator[Self]:
        """Open both stores (starting embedded servers where no URL is set) and yield.

        Both are closed when the block ends. The options are those of the constructor.
        On the embedded default (no ``DATABASE_URL``) the database is also set up and
        migrated, so a first run in development needs no other step; with a real server,
        run ``chatkeep setup`` and ``chatkeep migrate up`` (or :func:`migrate_up`) first.

        Raises:
            ConfigurationError: settings are missing or unsafe.
            Unavailable: PostgreSQL cannot be reached (Redis being down is tolerated).
            InvalidInput: an option is out of range.
        """
        settings = settings if settings is not None else Settings.load()
        with resolve_endpoints(settings) as found:
            if found.embedded_database:
                await bootstrap(found.admin_database_url, settings, generate_passwords=False)
                await migrate_up(settings, database_url=found.migrate_database_url)
            async with (
                Database(settings, dsn=found.database_url) as db,
                RedisClient.from_settings(settings, url=found.redis_url) as redis,
            ):
                chat = cls(
                    db,
                    redis,
                    node_id=node_id,
                    send_limit=send_limit,
                    presence_timeout=presence_timeout,
                    typing_ttl=typing_ttl,
                    bcrypt_rounds=bcrypt_rounds,
                    metrics=metrics,
                )
                try:
                    yield chat
                finally:
                    await chat.close()

    async def close(self) -> None:
        """Stop taking sends and finish the batches of sends in flight.

        :meth:`connect` calls it when its block ends; call it before closing the stores
        you handed to the constructor. Every send already accepted is answered (stored
        or failed) before it returns; a later :meth:`send_message` raises Unavailable.
        """
        if self.send_batcher is not None:
            await self.send_batcher.close()

    # -- loaders for the caches (PostgreSQL reads) -------------------------------------------

    async def _load_profile(self, user_id: uuid.UUID) -> UserProfile | None:
        user = await self.users.find_by_id(user_id)
        return user.profile() if user is not None else None

    async def _load_members(
        self, room_id: uuid.UUID, asking: uuid.UUID | None
    ) -> frozenset[uuid.UUID] | Unshared[frozenset[uuid.UUID]]:
        # Read as the asker. Through row security a member sees their room's whole member
        # list and anyone else sees less, so only a list that holds the asker is shared
        # through the cache; any other view answers this call alone.
        # No asker: "no one in particular" sees what the role sees, never shared.
        acting = (
            contextlib.nullcontext()
            if asking is None
            else self._acting(asking, "facade.load_members")
        )
        with _hidden_room():
            async with acting:
                found = await self.rooms.members(room_id)
        ids = frozenset(m.user.id for m in found.members)
        return ids if asking in ids else Unshared(ids)

    def _acting(
        self, user: uuid.UUID, name: str
    ) -> contextlib.AbstractAsyncContextManager[Transaction | None]:
        # Already acting as this user (a loader inside a flow): join, no savepoint.
        if self.db.acting_user() == user:
            return contextlib.nullcontext()
        return self.db.acting_as(user, name)

    def acting_as(
        self, user_id: uuid.UUID | str
    ) -> contextlib.AbstractAsyncContextManager[Transaction]:
        """A transaction acting as ``user_id``, for repository calls of your own.

        Row security then shows and lets the block write only what that user may (see
        :meth:`chatkeep.storage.Database.acting_as`)::

            async with chat.acting_as(user_id):
                rooms = await chat.rooms.rooms_of(user_id)

        Raises:
            InvalidInput: ``user_id`` is not a UUID, or the task is already in a
                transaction acting as someone else.
        """
        return self._acting_as_writer(check_id("user_id", user_id))

    @contextlib.asynccontextmanager
    async def _acting_as_writer(self, user: uuid.UUID) -> AsyncIterator[Transaction]:
        try:
            async with self.db.acting_as(user, "facade.acting_as") as tx:
                yield tx
        finally:
            # The block may have written: the user's next reads must see it.
            self._wrote(user)
        if self.db.replicas is not None and self.db.settings.replica_fence == "redis":
            async with self._best_effort("the replica fence"):
                await self._quietly("the replica fence", self._mark_recent_write(user))

    # -- read replicas: read-your-writes ------------------------------------------------------

    def _wrote(self, user: uuid.UUID, flow: _Flow | None = None) -> None:
        """Remember that ``user`` just wrote, so their next reads see it (see _read_as)."""
        replicas = self.db.replicas
        if replicas is None:
            return
        now = time.monotonic()
        recent = self._recent_writes
        recent.pop(user, None)  # re-inserted last: the dict stays ordered by time
        recent[user] = now
        if len(recent) > _RECENT_WRITES_KEPT:
            # Older than replica_max_lag, a write is on every replica that may be used.
            horizon = now - replicas.max_lag
            for old in [u for u, at in recent.items() if at < horizon]:
                del recent[old]
        if flow is not None and self.db.settings.replica_fence == "redis":
            flow.clean_up("the replica fence", lambda: self._mark_recent_write(user))

    @contextlib.contextmanager
    def _writing(self, user: uuid.UUID, flow: _Flow) -> Iterator[None]:
        """Remember ``user`` as a recent writer when the block ends, as _Flow.acting_as does.

        For a write in one round trip (``as_user``), even when it failed: a statement whose
        answer was lost may have committed.
        """
        try:
            yield
        finally:
            self._wrote(user, flow)

    async def _mark_recent_write(self, user: uuid.UUID) -> None:
        # Lives replica_max_lag: a process that no longer finds it only uses a replica
        # whose measured lag is at most that, so one that has this write. Its value names
        # the process that set it last: that one may rely on its own record instead (the
        # precise one), once moved past this SET, which came after every other process's
        # SET for this user and so after every write they marked.
        replicas = self.db.replicas
        lag = replicas.max_lag if replicas is not None else 0.0
        with self.redis.guard("replica.mark_write"):
            await self.redis.redis.set(
                self.redis.keys.recent_write(user), self._fence_token, px=round(lag * 1000) + 50
            )
        self._recent_writes[user] = max(self._recent_writes.get(user, 0.0), time.monotonic())

    async def _wrote_elsewhere(self, user: uuid.UUID) -> bool:
        with self.redis.guard("replica.fence", timeout=self.best_effort_timeout):
            mark = await self.redis.redis.get(self.redis.keys.recent_write(user))
        return mark is not None and mark != self._fence_token

    async def _read_as(
        self,
        user: uuid.UUID,
        name: str,
        work: Callable[[], Awaitable[_T]],
        *,
        one_statement: bool = False,
    ) -> _T:
        """Run ``work`` as ``user`` on a replica that has the user's last write, else the primary.

        In this process the rule is exact: a replica is used only if it is known to have
        replayed past a primary position sampled after the user's last write here. Across
        processes (``replica_fence=redis``) a write leaves a key in Redis for
        ``replica_max_lag``; while it is there, every process reads that user from the primary.
        """
        fence = (
            (lambda: self._wrote_elsewhere(user))
            if self.db.settings.replica_fence == "redis"
            else None
        )
        return await self.db.read_as(
            user,
            name,
            work,
            fresh_since=self._recent_writes.get(user),
            fence=fence,
            one_statement=one_statement,
        )

    async def _went_offline(self, users: Sequence[OfflineUser]) -> None:
        # last_seen goes to PostgreSQL when a user goes offline, not on every heartbeat.
        for gone in users:
            try:
                async with self.db.acting_as(gone.user_id, "facade.went_offline"):
                    await self.users.touch_last_seen(gone.user_id)
            except ChatkeepError as exc:  # presence must not fail over a missed last_seen
                logger.warning("last_seen of %s not written: %s", gone.user_id, exc)

    # -- metrics ----------------------------------------------------------------------------

    def _measured(self, name: str) -> contextlib.AbstractContextManager[object]:
        """Time operation ``name`` and count its errors (nothing without metrics)."""
        if self.metrics is None:
            return contextlib.nullcontext()
        return self.metrics.time_operation(name)

    @contextlib.asynccontextmanager
    async def _flow(
        self, name: str, *, after_commit: bool = True, reads: bool = False
    ) -> AsyncIterator[_Flow]:
        """One call of flow ``name`` (see :class:`_Flow`), timed and its errors counted.

        A flow whose Redis work must follow its own commit (``after_commit``, every flow
        that invalidates or publishes what it wrote) refuses to run inside the caller's
        transaction, which could still roll back what the events announce. Queued Redis
        work runs when the block ends without an error. A flow that only ``reads`` leaves
        no read-your-writes mark on the users it acts as.
        """
        with tracing.flow(name) as span, self._measured(name):
            if after_commit:
                self._outside_transaction(name)
            flow = _Flow(self, name, span, writes=not reads)
            yield flow
            await flow.after_commit()

    # -- best-effort Redis work after a commit ---------------------------------------------

    @contextlib.asynccontextmanager
    async def _best_effort(self, work: str) -> AsyncIterator[None]:
        """Give the block's Redis work ``best_effort_timeout`` in all, then go on without it.

        For work a flow can do without (the send limit check; cache invalidations and
        events after a commit): a frozen or unreachable Redis must not hold a write whose
        data is committed. Past the deadline the block is cancelled, and the miss is
        logged and counted as an Unavailable, not raised.
        """
        try:
            async with asyncio.timeout(self.best_effort_timeout) as deadline:
                yield
        except TimeoutError:
            if not deadline.expired():
                raise
            skipped = Unavailable(
                f"redis did not finish {work} within {self.best_effort_timeout:g} s"
            )
            logger.warning("%s skipped: %s", work, skipped)
            if self.metrics is not None:
                self.metrics.record_error(skipped)

    async def _publish(self, *events: Event) -> None:
        if not events:
            return
        try:
            receivers = await self.events.publish_many(events)
        except ChatkeepError as exc:
            # The change is committed; subscribers will see a gap and catch up by seq.
            logger.warning(
                "%d event(s) not published: %s", len(events), exc, extra={"events": len(events)}
            )
            return
        if self.metrics is not None:
            for count in receivers:
                self.metrics.published(count)

    async def _invalidate_members(self, *room_ids: uuid.UUID) -> None:
        if room_ids and not await self.members.invalidate(*room_ids):
            # Entries expire with their TTL; logged so the staleness is visible.
            logger.warning(
                "membership cache not invalidated for %d room(s)",
                len(room_ids),
                extra={"rooms": len(room_ids)},
            )

    async def _after_commit_together(
        self,
        flow: str,
        rooms: Sequence[uuid.UUID],
        left: Sequence[tuple[uuid.UUID, uuid.UUID]],
        events: Sequence[Event],
    ) -> None:
        """Invalidate ``rooms``, drop the ``left`` presences and typing, publish ``events``.

        In that order, in one pipeline: one round trip on a single server. A failure is
        logged (and counted), never raised: the change is committed.
        """
        if not (rooms or left or events):
            return
        keys = self.redis.keys
        pipe = self.redis.pipeline()
        self.members.queue_invalidate(pipe, *rooms)
        for room_id, user_id in left:
            pipe.zrem(keys.room_presence(room_id), str(user_id))
            pipe.zrem(keys.typing(room_id), str(user_id))
        counts = self.events.queue_publish(pipe, events)
        try:
            with self.redis.guard("facade.after_commit"):
                results = await pipe.execute()
        except ChatkeepError as exc:
            if rooms:
                self.members.invalidated(exc)
            # Entries expire with their TTL, presence with its timeout, typing with its
            # TTL; subscribers see a gap and catch up by position.
            logger.warning(
                "%s's Redis work after the commit skipped (%d room(s) invalidated, "
                "%d event(s)): %s",
                flow,
                len(rooms),
                len(events),
                exc,
                extra={"rooms": len(rooms), "events": len(events)},
            )
            return
        if rooms:
            self.members.invalidated(None)
        if self.metrics is not None:
            for count in results[counts]:
                self.metrics.published(int(count))

    async def _invalidate_profile(self, user_id: uuid.UUID) -> None:
        if not await self.profiles.invalidate(user_id):
            logger.warning("profile cache not invalidated for %s", user_id)

    async def _quietly(self, operation: str, work: Awaitable[object]) -> None:
        """Await ``work`` (Redis-only clean-up) and log instead of raising."""
        try:
            await work
        except ChatkeepError as exc:
            logger.warning("%s skipped: %s", operation, exc)

    def _as_actor_or_system(
        self, actor: uuid.UUID | None, name: str, *, isolation: IsolationLevel | None = None
    ) -> contextlib.AbstractAsyncContextManager[Transaction]:
        # ``by=None`` is system work: no acting user, so under row security it needs a
        # role the policies do not confine (the migrator's, say), as the docs say.
        if actor is None:
            return self.db.transaction(name, isolation=isolation)
        return self.db.acting_as(actor, name, isolation=isolation)

    def _outside_transaction(self, flow: str) -> None:
        # Redis work must follow the commit: inside the caller's transaction an event
        # could announce, or an invalidation be refilled with, what is then rolled back.
        if self.db.in_transaction():
            raise ChatkeepError(
                f"{flow} publishes after its commit: call it outside db.transaction()"
            )

    async def _require_member(self, room_id: uuid.UUID, user_id: uuid.UUID) -> None:
        # The cache answers members only (one SISMEMBER, whatever the room's size); anyone
        # else is answered from PostgreSQL as themselves (RoomMembersCache.is_member): a
        # room they cannot see raises NotFound (ROOM_NOT_FOUND) from the loader, a
        # visible one falls through to here.
        if not await self.members.is_member(room_id, user_id):
            raise PermissionDenied("only members of the room may do this")

    async def _member_page(
        self,
        room_id: uuid.UUID,
        user_id: uuid.UUID,
        read: Callable[[], Awaitable[CursorPage[MessageWithUser]]],
    ) -> CursorPage[MessageWithUser]:
        """The page ``read`` gives (as ``user_id``), for a member of the room only.

        On PostgreSQL the page's function proves membership itself (migration 017: rows
        only for a member, under any role), so a page with rows needs no other check and
        the cache is asked only about an empty page (or a message not found), to answer a
        non-member with PermissionDenied or NotFound as before: the common read is one
        round trip to PostgreSQL and none to Redis, whatever the room's size. On Citus
        (015's function, no such proof) the member check comes first, as before.
        """
        if self.db.settings.citus:
            await self._require_member(room_id, user_id)
            return await read()
        try:
            page = await read()
        except NotFound as exc:
            if exc.entity == "message":  # around a message: none, or not theirs to see
                await self._require_member(room_id, user_id)
            raise
        if not page.items:
            await self._require_member(room_id, user_id)
        return page

    async def _require_member_or_hide(self, room_id: uuid.UUID, user_id: uuid.UUID) -> None:
        # The change log is for members only: to anyone else, a public room is as absent
        # as a private one (the contract of changes() and room_position()).
        with _hidden_room():
            try:
                await self._require_member(room_id, user_id)
            except PermissionDenied:
                raise NotFound(ROOM_NOT_FOUND, entity="room") from None

    async def _revoke_logins(self, user_id: uuid.UUID, why: str) -> None:
        try:
            await self.sessions.revoke_all(user_id)
            await self.tokens.revoke_all(user_id)
        except ChatkeepError as exc:
            raise Unavailable(
                f"{why} is stored, but the user's sessions could not be revoked ({exc}); "
                "call it again to finish"
            ) from exc

    # -- accounts ---------------------------------------------------------------------------

    async def register(self, dto: CreateUserDto) -> User:
        """Create an account (the password is hashed with bcrypt).

        Raises:
            Conflict: the email or username is taken.
            InvalidInput: ``dto`` is not a CreateUserDto.
        """
        async with self._flow("register", after_commit=False) as flow:
            # A profile read of this id before it existed cached nothing (no negative
            # caching), so there is nothing to invalidate.
            user = await self.users.register(dto)
            self._wrote(user.id, flow)  # a replica may not know the new account yet
            return user

    async def login(self, email: str, password: str) -> LoginResult | None:
        """Check a password (throttled per account) and start a session.

        Returns ``None`` for a wrong email or password, or an inactive account, in the
        same time either way; each such failure counts toward the account's lockout.

        Raises:
            RateLimited: the account is locked after repeated failures, or tried too fast
                (``retry_after`` says how long to wait).
            InvalidInput: ``email`` is not an email address, or ``password`` not a string.
            Unavailable: Redis is down (logins need sessions, which live there).
        """
        async with self._flow("login", after_commit=False):
            account = _login_account(email)
            if not isinstance(password, str):
                raise InvalidInput("password", "must be a string")
            await self.login_throttle.check(account)
            try:
                user = await self.users.authenticate(email, password)
            except InvalidInput:
                user = None  # a password no account can have (too long): a plain failure
            if user is None:
                await self.login_throttle.record_failure(account)
                return None
            await self.login_throttle.record_success(account)
            session = await self.sessions.create(user.id)
            refresh = await self.tokens.issue(user.id, session_id=session.session.session_id)
            return LoginResult(user, session, refresh)

    async def refresh(self, refresh_token: str) -> LoginResult:
        """Rotate a refresh token and start a new session of the same login.

        The token is spent and the family's next one returned with a new session, which
        replaces the session the login held (so refreshing never piles up sessions). A
        refresh token presented a second time means two parties hold the login (a thief,
        or a client that lost a reply): the whole login is revoked, its family and every
        session it minted, and both must log in again. Other logins of the user are not
        touched.

        Raises:
            PermissionDenied: the token is unknown, expired, revoked or already used (then
                the login is revoked), or the account is no longer active.
            InvalidInput: ``refresh_token`` is not shaped like a refresh token.
            Unavailable: Redis could not be reached (after a reuse, presenting any token
                of the login again finishes its revocation).
        """
        async with self._flow("refresh", after_commit=False) as flow:
            try:
                rotated = await self.tokens.rotate(refresh_token)
            except InvalidInput as exc:  # the store calls it ``token``: name it as called
                raise InvalidInput("refresh_token", exc.rule) from exc
            async with flow.acting_as(rotated.user_id):
                user = await self.users.find_by_id(rotated.user_id)
            if user is None or not user.is_active:
                # Deactivation revokes logins itself; this covers a refresh racing with it.
                await self.tokens.revoke_family(rotated.family_id)
                raise PermissionDenied("the account is not active")
            session = await self.sessions.create(user.id)
            try:
                await self.tokens.attach_session(rotated.family_id, session.session.session_id)
            except BaseException:
                # The family was revoked in between (or Redis failed): the new session
                # must not outlive it.
                await asyncio.shield(
                    self._quietly(
                        "sessions.revoke",
                        self.sessions.revoke(user.id, session.session.session_id),
                    )
                )
                raise
            return LoginResult(user, session, rotated)

    async def unlock_login(self, email: str) -> None:
        """Lift a login lockout and forget the account's failures (an administrator's act).

        Raises:
            InvalidInput: ``email`` is not an email address.
            Unavailable: Redis could not be reached.
        """
        await self.login_throttle.unlock(_login_account(email))

    async def update_profile(self, user_id: uuid.UUID, dto: UpdateUserDto) -> User:
        """Change a user's username and/or avatar, then invalidate their cached profile.

        Raises:
            NotFound: no such user.
            Conflict: the new username is taken.
            InvalidInput: a bad id, or ``dto`` is not an UpdateUserDto.
        """
        async with self._flow("update_profile") as flow:
            key = check_id("user_id", user_id)
            async with flow.acting_as(key):
                user = await self.users.update_profile(key, dto)
            flow.invalidate_profile(user.id)
        return user

    async def change_password(
        self, user_id: uuid.UUID, current_password: str, new_password: str
    ) -> None:
        """Replace a password, then end every session and refresh token of the user.

        Whoever knew the old password is logged out everywhere; the user logs in again
        with the new one. (The cached profile holds no password, so it stays.)

        Raises:
            NotFound: no such user.
            PermissionDenied: ``current_password`` is wrong.
            InvalidInput: ``new_password`` breaks a rule, or ``current_password`` is no
                password at all (not a string, lone surrogates, over 72 bytes).
            Conflict: the password was changed concurrently; nothing was written.
            Unavailable: the password is changed but Redis could not revoke the sessions
                (call again with the new password as current to finish).
        """
        async with self._flow("change_password") as flow:
            key = check_id("user_id", user_id)
            async with flow.acting_as(key):
                await self.users.change_password(key, current_password, new_password)
            await self._revoke_logins(key, "the password change")

    async def deactivate_user(self, user_id: uuid.UUID) -> User:
        """Deactivate an account: it can no longer log in, and its sessions end.

        Persists, invalidates the cached profile, then revokes every session and refresh
        token. Idempotent.

        Raises:
            NotFound: no such user.
            InvalidInput: a bad id.
            Unavailable: the account is deactivated but Redis could not revoke its
                sessions (call again to finish).
        """
        async with self._flow("deactivate_user") as flow:
            key = check_id("user_id", user_id)
            async with flow.acting_as(key):
                user = await self.users.deactivate(key)
            # The invalidation is best-effort (its entry ages out); the revocation is not.
            flow.invalidate_profile(user.id)
            await flow.after_commit()
            await self._revoke_logins(user.id, "the deactivation")
        return user

    async def profile(self, user_id: uuid.UUID) -> UserProfile | None:
        """A user's public profile, from the cache (PostgreSQL on a miss or an outage).

        Raises:
            InvalidInput: a bad id.
        """
        return await self.profiles.get(check_id("user_id", user_id))

    # -- messages ---------------------------------------------------------------------------

    async def send_message(
        self,
        room_id: uuid.UUID,
        user_id: uuid.UUID,
        content: str,
        *,
        client_msg_id: str | None = None,
        type: MessageType = "text",
        reply_to: uuid.UUID | None = None,
    ) -> Message:
        """Rate-limit, persist, publish ``message.created``; returns the stored message.

        With ``reply_to``, the message is a reply in the thread of that message (a reply to
        a reply goes to its root): it is still a message of the room, with the room's next
        ``seq``, and the database updates the thread's summary and followers. ``@username``
        names members (others are ignored); ``@room``, ``@here`` and ``@all`` mention the
        whole room when an owner or admin sends them (``docs/design.md``).

        A repeated ``client_msg_id`` returns the first message (its ``seq`` unchanged,
        nothing new stored) and publishes it again, so a retry after a lost publish
        still reaches subscribers (they de-duplicate by ``message_id``). A retry counts
        toward the rate limit like any send. With Redis down the limit is not checked
        (fails open) and nothing is published; a frozen or unreachable Redis holds the
        send for at most ``redis_best_effort_timeout`` before the limit check and as long
        after the commit.

        Raises:
            RateLimited: the user sends too fast (``retry_after`` says how long to wait).
            PermissionDenied: the user is not a member of the (public) room, or it is
                archived.
            NotFound: no such room, or one the user cannot see (``room not found``);
                ``reply_to`` names no message, a deleted one, or one the user cannot see
                (``message not found``).
            InvalidInput: the content or ids break a rule; ``reply_to`` is a message of
                another room.
        """
        async with self._flow("send_message") as flow:
            dto = CreateMessageDto.checked(
                room_id=room_id,
                user_id=user_id,
                content=content,
                type=type,
                client_msg_id=client_msg_id,
                reply_to=reply_to,
            )
            flow.about(room_id=dto.room_id, user_id=dto.user_id)
            try:
                with _reply_errors():
                    if self.send_batcher is not None:
                        message, _ = await self.send_batcher.submit(dto)
                    else:
                        pending = PendingSend(dto, asyncio.get_running_loop().create_future())
                        await self._write_sends([pending])
                        message, _ = await pending.future
            finally:
                # As _Flow.acting_as does for every other write (read-your-writes with
                # replicas), even when it failed: a lost COMMIT answer may have committed.
                self._wrote(dto.user_id, flow)
        return message

    async def _write_sends(self, batch: Sequence[PendingSend]) -> None:
        """Write one batch of sends and answer each (the group commit's ``write``).

        The senders' rate limits in one Redis pipeline (fail open), then one PostgreSQL
        statement storing every allowed message as its own sender under row security,
        then the ``message.created`` events in one pipeline; each caller is answered
        after the commit and the publish, with its own message or its own error.
        """
        allowed = list(batch)
        # Fail open: an outage of the limiter must not stop messages.
        async with self._best_effort("the send rate limit check"):
            try:
                checks = await self.limiter.check_many([str(p.dto.user_id) for p in batch], "send")
            except Unavailable as exc:
                logger.warning("send rate limit not checked (redis unavailable): %s", exc)
            else:
                allowed = []
                for pending, check in zip(batch, checks, strict=True):
                    if check.allowed:
                        allowed.append(pending)
                        continue
                    # As RateLimiter.enforce says it; the caller's flow counts it.
                    pending.answer(
                        RateLimited(
                            f"rate limit of 'send' reached; retry in {check.retry_after:.3f} s",
                            retry_after=check.retry_after,
                            action="send",
                        )
                    )
        if not allowed:
            return
        try:
            results = await self.messages.send_many([p.dto for p in allowed])
        except ChatkeepError as exc:
            for pending in allowed:
                pending.answer(exc)
            return
        events: list[Event] = []
        answers: list[tuple[PendingSend, tuple[Message, int | None] | ChatkeepError]] = []
        mentioned = await self._sent_mentions(results)
        for pending, result in zip(allowed, results, strict=True):
            if isinstance(result, NotFound) and result.entity == "room":
                # A room the sender cannot see answers as one that does not exist.
                result = NotFound(ROOM_NOT_FOUND, entity="room")
            answers.append((pending, result))
            if isinstance(result, ChatkeepError):
                continue
            message, position = result
            if mentioned is None and "@" in message.content:
                continue  # its mentions are unknown: subscribers read it from the log
            mentions, room_wide = (mentioned or {}).get(message.id, ((), False))
            events.append(
                MessageCreated(
                    position=position,
                    room_id=message.room_id,
                    message_id=message.id,
                    seq=message.seq,
                    sender_id=message.user_id,
                    client_msg_id=message.client_msg_id,
                    body=message.content,
                    reply_to=message.reply_to,
                    mentions=mentions,
                    mentions_room=room_wide,
                    # Stamped here as the bus would (it would copy the event to do it).
                    origin=self.node_id,
                )
            )
        if events:
            async with self._best_effort("send_message's publish"):
                await self._publish(*events)
        if self.db.settings.citus:
            # The send knows each message's room: remember it for the thread calls that
            # will name the message by its id alone (a hint, so never raises).
            await self.message_rooms.remember_many(
                (result[0].id, result[0].room_id)
                for _, result in answers
                if not isinstance(result, ChatkeepError)
            )
        for pending, result in answers:
            pending.answer(result)

    async def _sent_mentions(
        self, results: Sequence[SendResult]
    ) -> dict[uuid.UUID, tuple[tuple[uuid.UUID, ...], bool]] | None:
        """The mentions of the newly stored messages of a send batch, for their events.

        Only a message with an ``@`` can mention anyone (migration 015's trigger reads no
        other), so a batch without one costs nothing. ``None`` when they could not be read
        (the messages are stored: their events are left out, and subscribers find them in
        the log through the position gap or the outbox relay, mentions included).
        """
        sent = [
            (message.id, message.user_id)
            for message, _ in (r for r in results if not isinstance(r, ChatkeepError))
            if "@" in message.content
        ]
        if not sent:
            return {}
        try:
            return await self.change_log.sent_mentions(sent)
        except ChatkeepError as exc:
            logger.warning("mentions of sent messages not read, not published live: %s", exc)
            return None

    async def edit_message(
        self, message_id: uuid.UUID, user_id: uuid.UUID, content: str
    ) -> Message:
        """Edit the author's own message, then publish ``message.edited``.

        Raises:
            NotFound: no such message, or one the user cannot see (``message not found``).
            PermissionDenied: the user is not the author.
            InvalidInput: the content or ids break a rule.
        """
        async with self._flow("edit_message") as flow:
            editor = check_id("user_id", user_id)
            key = check_id("message_id", message_id)
            if self.db.settings.citus:  # no flow functions there (migration 018)
                async with flow.acting_as(editor, hide="message"):
                    message = await self.messages.edit(key, content, by=editor)
                    position = await self.change_log.last_position()
            else:
                with flow.writing_as(editor, hide="message"):
                    message, position = await self.messages.edit_logged(key, content, by=editor)
            flow.about(room_id=message.room_id)
            flow.publish(
                MessageEdited(
                    position=position,
                    room_id=message.room_id,
                    message_id=message.id,
                    seq=message.seq,
                    editor_id=editor,
                    body=message.content,
                )
            )
        return message

    async def delete_message(self, message_id: uuid.UUID, user_id: uuid.UUID) -> bool:
        """Delete a message (its author, or an owner/admin of its room); publish it.

        Its ``seq`` is not reused: history and catch-up skip it.

        Returns:
            False if there was no such message (nothing is published then).

        Raises:
            PermissionDenied: the user may not delete it.
            InvalidInput: a bad id.
        """
        async with self._flow("delete_message") as flow:
            key = check_id("message_id", message_id)
            actor = check_id("user_id", user_id)
            if self.db.settings.citus:  # no flow functions there (migration 018)
                async with flow.acting_as(actor):
                    found = await self.messages.find_by_id(key)
                    if found is None or not await self.messages.delete(key, by=actor):
                        return False
                    position = await self.change_log.last_position()
                deleted = (found.room_id, found.seq, position)
            else:
                with flow.writing_as(actor):
                    gone = await self.messages.delete_logged(key, by=actor)
                if gone is None:
                    return False
                deleted = gone
            room, seq, position = deleted
            flow.publish(
                MessageDeleted(
                    position=position,
                    room_id=room,
                    message_id=key,
                    seq=seq,
                    deleted_by=actor,
                )
            )
        return True

    async def react(self, message_id: uuid.UUID, user_id: uuid.UUID, emoji: str) -> bool:
        """Add the user's ``emoji`` reaction to a message; publishes ``reaction.added``.

        Returns:
            False if the user had already reacted with it (nothing changes then, and
            nothing is published).

        Raises:
            NotFound: no such message, a deleted one, or one in a room the user is not in
                (``message not found``).
            InvalidInput: a bad id, or ``emoji`` breaks the emoji rule
                (:func:`chatkeep.models.check_emoji`).
        """
        return await self._react("react", message_id, user_id, emoji, added=True)

    async def unreact(self, message_id: uuid.UUID, user_id: uuid.UUID, emoji: str) -> bool:
        """Take back the user's ``emoji`` reaction; publishes ``reaction.removed``.

        Returns:
            False if the user had not reacted with it (nothing is published then).

        Raises:
            NotFound: no such message, a deleted one, or one in a room the user is not in
                (``message not found``).
            InvalidInput: a bad id, or ``emoji`` breaks the emoji rule.
        """
        return await self._react("unreact", message_id, user_id, emoji, added=False)

    async def _react(
        self, name: str, message_id: uuid.UUID, user_id: uuid.UUID, emoji: str, *, added: bool
    ) -> bool:
        async with self._flow(name) as flow:
            key = check_id("message_id", message_id)
            user = check_id("user_id", user_id)
            flow.about(user_id=user)
            if self.db.settings.citus:  # no flow functions there (migration 018)
                change = self.reactions.react if added else self.reactions.unreact
                async with flow.acting_as(user, hide="message"):
                    if not await change(key, user, emoji):
                        return False
                    logged = await self.change_log.last_change()
            else:
                write = self.reactions.react_logged if added else self.reactions.unreact_logged
                with flow.writing_as(user, hide="message"):
                    logged = await write(key, user, emoji)
                if logged is None:
                    return False
            if logged is not None:  # pragma: no branch - the trigger logs every change
                flow.about(room_id=logged.room_id)
                event = ReactionAdded if added else ReactionRemoved
                flow.publish(
                    event(
                        position=logged.position,
                        room_id=logged.room_id,
                        message_id=key,
                        seq=logged.seq,
                        user_id=user,
                        emoji=emoji,
                        count=logged.data["count"],
                    )
                )
        return True

    async def room_position(self, room_id: uuid.UUID, user_id: uuid.UUID) -> int:
        """The room's current position in its change log, for a member.

        A client loading a fresh snapshot reads this first, then history, then applies
        :meth:`changes` after it (applying a change twice is harmless: changes carry
        resulting state).

        Raises:
            NotFound: no such room, or one the user is not in (``room not found``).
            InvalidInput: a bad id.
        """
        async with self._flow("room_position", after_commit=False, reads=True) as flow:
            room = check_id("room_id", room_id)
            user = check_id("user_id", user_id)
            flow.about(room_id=room, user_id=user)
            await self._require_member_or_hide(room, user)
            with flow.as_user(user, hide="room"):
                return await self.change_log.position(room, as_user=user)

    async def changes(
        self,
        room_id: uuid.UUID,
        user_id: uuid.UUID,
        *,
        after: int,
        limit: int = DEFAULT_CHANGES_LIMIT,
    ) -> ChangePage:
        """The room's changes after position ``after``, ascending, for a member.

        Pass each page's ``next_after`` as ``after`` until it is ``None``. Every change a
        member can see is there exactly once, in commit order (message created, edited,
        deleted; reaction added, removed; member joined, left, removed, role changed;
        room updated). Changes carry resulting state, so a client applies them onto a
        snapshot read after :meth:`room_position` (``docs/design.md``, "The room change
        log").

        Raises:
            ResyncRequired: the changes after ``after`` are no longer kept (retention):
                reload the room and resume from the error's ``position``.
            NotFound: no such room, or one the user is not in (``room not found``).
            InvalidInput: a bad id, a negative or future ``after``, or ``limit`` outside
                1..1000.
        """
        async with self._flow("changes", after_commit=False, reads=True) as flow:
            room = check_id("room_id", room_id)
            user = check_id("user_id", user_id)
            flow.about(room_id=room, user_id=user)
            await self._require_member_or_hide(room, user)
            with flow.as_user(user, hide="room"):
                return await self.change_log.changes(room, after=after, limit=limit, as_user=user)

    async def mark_read(
        self, room_id: uuid.UUID, user_id: uuid.UUID, seq: int | None = None
    ) -> int:
        """Move the user's read watermark forward (default: to the newest message); publish.

        Returns:
            The watermark after the call (it never moves backward, nor past the newest
            message).

        Raises:
            NotFound: no such room, or one the user cannot see (``room not found``).
            PermissionDenied: the user is not a member of the (public) room.
            InvalidInput: a bad id or ``seq``.
        """
        async with self._flow("mark_read") as flow:
            room = check_id("room_id", room_id)
            user = check_id("user_id", user_id)
            flow.about(room_id=room, user_id=user)
            # A write: the user's next reads (unread counts, badges) must see it, so it
            # leaves the read-your-writes mark as every other write does.
            with flow.writing_as(user, hide="room"):
                watermark = await self.messages.mark_read(room, user, seq, as_user=user)
            flow.publish(MessagesRead(room_id=room, user_id=user, last_read_seq=watermark))
        return watermark

    async def unread_counts(self, user_id: uuid.UUID) -> UnreadCounts:
        """Unread messages per room for every room of the user (one query, one round trip).

        A ``Mapping[UUID, int]`` of room to unread messages that also carries each room's
        badge (``counts.badge(room_id)``: mentions, unread threads, thread mentions), read
        by the same statement as :meth:`badges` (on Citus: the unread counts only).

        Raises:
            NotFound: no such user.
            InvalidInput: a bad id.
        """
        async with self._flow("unread_counts", after_commit=False, reads=True) as flow:
            user = check_id("user_id", user_id)
            return await flow.read_as(
                user,
                lambda: self.messages.unread_counts(user, as_user=user),
                one_statement=True,
            )

    async def badges(self, user_id: uuid.UUID) -> dict[uuid.UUID, RoomBadges]:
        """What to badge each of the user's rooms with, in one query (no background job).

        Per room: ``unread`` (as :meth:`unread_counts`), ``mentions`` (unread messages
        naming the user, or the room by someone else), ``unread_threads`` (followed
        threads with replies after the user's thread watermark) and ``thread_mentions``.
        :meth:`unread_counts` stays the lazy ``room -> int`` mapping it always was (it
        reads the same statement: ``counts.badge(room_id)``). One round trip.

        Raises:
            InvalidInput: a bad id.
        """
        async with self._flow("badges", after_commit=False, reads=True) as flow:
            user = check_id("user_id", user_id)
            return await flow.read_as(
                user, lambda: self.threads.badges(user, as_user=user), one_statement=True
            )

    # -- threads and mentions ---------------------------------------------------------------

    async def thread(
        self,
        root_message_id: uuid.UUID,
        user_id: uuid.UUID,
        *,
        cursor: str | None = None,
        before_seq: int | None = None,
        after_seq: int | None = None,
        around: int | None = None,
        limit: int = DEFAULT_PAGE_SIZE,
    ) -> CursorPage[MessageWithUser]:
        """A page of a thread's replies for a member of its room, ascending ``seq``.

        With no position, the newest page; otherwise one of ``cursor``, ``before_seq``,
        ``after_seq`` or ``around`` (room seqs, as the replies carry them). The root
        itself is not in the page (it is in the room's history; :meth:`thread_summary`
        has the counts). A reply's id pages its root's thread.

        Raises:
            NotFound: no such message, a deleted one, or one the user cannot see
                (``message not found``).
            InvalidInput: a bad id, more than one position, a bad cursor or ``limit``.
        """
        async with self._flow("thread", after_commit=False) as flow:
            root = check_id("root_message_id", root_message_id)
            user = check_id("user_id", user_id)
            async with flow.acting_as(user, hide="message"):
                return await self.threads.page(
                    root,
                    cursor=cursor,
                    before_seq=before_seq,
                    after_seq=after_seq,
                    around=around,
                    limit=limit,
                )

    async def thread_summary(
        self, root_message_id: uuid.UUID, user_id: uuid.UUID
    ) -> ThreadSummary | None:
        """The thread's reply count, last reply and participants; ``None`` with no replies.

        Raises:
            NotFound: no such message, or one the user cannot see (``message not found``).
            InvalidInput: a bad id.
        """
        async with self._flow("thread_summary", after_commit=False) as flow:
            root = check_id("root_message_id", root_message_id)
            user = check_id("user_id", user_id)
            async with flow.acting_as(user, hide="message"):
                return await self.threads.summary(root)

    async def collapsed_history(
        self,
        room_id: uuid.UUID,
        user_id: uuid.UUID,
        *,
        cursor: str | None = None,
        before_seq: int | None = None,
        after_seq: int | None = None,
        around: int | None = None,
        limit: int = DEFAULT_PAGE_SIZE,
    ) -> CursorPage[MessageWithUser]:
        """The room's history for a member with thread replies left out.

        Each root carries its summary in ``thread`` (reply count, last reply,
        participants); :meth:`thread` pages its replies. Positions as :meth:`history`
        takes them (``around`` a seq).

        Raises:
            PermissionDenied: the user is not a member of a public room.
            NotFound: no such room, or one the user cannot see (``room not found``).
            InvalidInput: a bad id, more than one position, a bad cursor or ``limit``.
        """
        async with self._flow("collapsed_history", after_commit=False) as flow:
            room = check_id("room_id", room_id)
            user = check_id("user_id", user_id)
            flow.about(room_id=room, user_id=user)
            await self._require_member(room, user)
            async with flow.acting_as(user):
                return await self.threads.collapsed_history(
                    room,
                    cursor=cursor,
                    before_seq=before_seq,
                    after_seq=after_seq,
                    around=around,
                    limit=limit,
                )

    async def room_threads(
        self,
        room_id: uuid.UUID,
        user_id: uuid.UUID,
        *,
        before_seq: int | None = None,
        limit: int = DEFAULT_LIST_SIZE,
    ) -> list[ThreadSummary]:
        """The room's threads for a member, latest reply first.

        The collapsed view's companion: roots with their reply summary, read from the
        thread table without reading any reply.

        Pass the last item's ``last_reply_seq`` as ``before_seq`` for the next page.

        Raises:
            PermissionDenied: the user is not a member of a public room.
            NotFound: no such room, or one the user cannot see (``room not found``).
            InvalidInput: a bad id, ``before_seq`` or ``limit`` (1..200).
        """
        async with self._flow("room_threads", after_commit=False) as flow:
            room = check_id("room_id", room_id)
            user = check_id("user_id", user_id)
            flow.about(room_id=room, user_id=user)
            await self._require_member(room, user)
            async with flow.acting_as(user):
                return await self.threads.room_threads(room, before_seq=before_seq, limit=limit)

    async def followed_threads(
        self,
        user_id: uuid.UUID,
        *,
        room_id: uuid.UUID | None = None,
        before: ThreadSummary | None = None,
        limit: int = DEFAULT_LIST_SIZE,
    ) -> list[FollowedThread]:
        """The threads the user follows, latest reply first, with unread and mention counts.

        Pass the last item's ``thread`` as ``before`` for the next page.

        Raises:
            InvalidInput: a bad id, ``before`` or ``limit`` (1..200).
        """
        async with self._flow("followed_threads", after_commit=False) as flow:
            user = check_id("user_id", user_id)
            async with flow.acting_as(user):
                return await self.threads.followed(
                    user, room_id=room_id, before=before, limit=limit
                )

    async def mark_thread_read(self, root_message_id: uuid.UUID, user_id: uuid.UUID) -> int:
        """Move the user's read watermark in the thread to its last reply (never backward).

        Returns:
            The watermark after the call: the room seq of the last reply read (0 for a
            thread without replies).

        Raises:
            NotFound: no such message, or one the user cannot see (``message not found``).
            InvalidInput: a bad id.
        """
        async with self._flow("mark_thread_read", after_commit=False) as flow:
            root = check_id("root_message_id", root_message_id)
            user = check_id("user_id", user_id)
            if self.db.settings.citus:  # no flow functions there (migration 018)
                async with flow.acting_as(user, hide="message"):
                    return await self.threads.mark_read(root, user)
            with flow.writing_as(user, hide="message"):
                return await self.threads.mark_read(root, user, as_user=user)

    async def follow_thread(self, root_message_id: uuid.UUID, user_id: uuid.UUID) -> None:
        """Follow the thread (its replies then count in :meth:`badges`).

        Replying in a thread, being mentioned in it, or having written its root follows it
        already. Following anew starts from the thread's last reply.

        Raises:
            NotFound: no such message, or one the user cannot see (``message not found``).
            InvalidInput: a bad id.
        """
        await self._follow("follow_thread", root_message_id, user_id, following=True)

    async def unfollow_thread(self, root_message_id: uuid.UUID, user_id: uuid.UUID) -> None:
        """Stop following the thread (until the user replies or is mentioned in it).

        Raises:
            NotFound: no such message, or one the user cannot see (``message not found``).
            InvalidInput: a bad id.
        """
        await self._follow("unfollow_thread", root_message_id, user_id, following=False)

    async def _follow(
        self, name: str, root_message_id: uuid.UUID, user_id: uuid.UUID, *, following: bool
    ) -> None:
        async with self._flow(name, after_commit=False) as flow:
            root = check_id("root_message_id", root_message_id)
            user = check_id("user_id", user_id)
            if self.db.settings.citus:  # no flow functions there (migration 018)
                async with flow.acting_as(user, hide="message"):
                    await self.threads.follow(root, user, following=following)
                return
            with flow.writing_as(user, hide="message"):
                await self.threads.follow(root, user, following=following, as_user=user)

    async def mentions(
        self,
        user_id: uuid.UUID,
        *,
        before: uuid.UUID | None = None,
        limit: int = DEFAULT_LIST_SIZE,
    ) -> list[Mention]:
        """The user's mentions inbox, newest first.

        Messages naming them, and room mentions (``@room``) of their rooms by others.

        Pass the last item's ``message_id`` as ``before`` for the next page.

        Raises:
            InvalidInput: a bad id or ``limit`` (1..200).
        """
        async with self._flow("mentions", after_commit=False) as flow:
            user = check_id("user_id", user_id)
            async with flow.acting_as(user):
                return await self.threads.mentions(user, before=before, limit=limit)

    async def catch_up(
        self,
        room_id: uuid.UUID,
        user_id: uuid.UUID,
        *,
        after_seq: int | None = None,
        cursor: str | None = None,
        limit: int = DEFAULT_PAGE_SIZE,
    ) -> CursorPage[MessageWithUser]:
        """Messages of the room after a position, from PostgreSQL, for a member.

        This is how a client that reconnects (or whose subscription reported a gap)
        misses nothing: it asks for everything after the last ``seq`` it saw, then
        passes each page's ``after`` as ``cursor`` until ``after`` is ``None``. Each
        message comes exactly once, in ``seq`` order; deleted ones are skipped.

        Args:
            room_id: the room.
            user_id: the member asking (a page with messages proves membership by
                itself; an empty one is checked through the member cache).
            after_seq: the last seq the client has (0: from the beginning).
            cursor: an ``after`` cursor of a previous page, instead of ``after_seq``.
            limit: messages per page, 1 to 200.

        Raises:
            PermissionDenied: the user is not a member of a public room.
            NotFound: no such room, or one the user cannot see (``room not found``).
            InvalidInput: not exactly one of ``after_seq`` and ``cursor``, a cursor that
                does not point forward or belongs to another room, or a bad ``limit``.
        """
        async with self._flow("catch_up", after_commit=False, reads=True) as flow:
            room = check_id("room_id", room_id)
            user = check_id("user_id", user_id)
            flow.about(room_id=room, user_id=user)
            if (after_seq is None) == (cursor is None):
                raise InvalidInput("after_seq", "give exactly one of after_seq and cursor")
            if cursor is not None and decode_cursor(cursor)[2] != "after":
                raise InvalidInput("cursor", "must be an `after` cursor (catch-up reads forward)")
            return await self._member_page(
                room,
                user,
                lambda: self.messages.history(
                    room, after_seq=after_seq, cursor=cursor, limit=limit, as_user=user
                ),
            )

    async def history(
        self,
        room_id: uuid.UUID,
        user_id: uuid.UUID,
        *,
        cursor: str | None = None,
        before_seq: int | None = None,
        after_seq: int | None = None,
        around: int | uuid.UUID | None = None,
        limit: int = DEFAULT_PAGE_SIZE,
    ) -> CursorPage[MessageWithUser]:
        """A page of the room's history for a member, authors joined, ascending ``seq``.

        With no position, the newest page; otherwise one of ``cursor``, ``before_seq``,
        ``after_seq`` or ``around``, as :meth:`MessageRepository.history
        <chatkeep.storage.MessageRepository.history>` takes them.

        Raises:
            PermissionDenied: the user is not a member of a public room.
            NotFound: no such room, or one the user cannot see (``room not found``), or
                ``around`` names a message not in it.
            InvalidInput: a bad id, more than one position, a bad cursor or ``limit``.
        """
        async with self._flow("history", after_commit=False, reads=True) as flow:
            room = check_id("room_id", room_id)
            user = check_id("user_id", user_id)
            flow.about(room_id=room, user_id=user)
            return await flow.read_as(
                user,
                lambda: self._member_page(
                    room,
                    user,
                    lambda: self.messages.history(
                        room,
                        cursor=cursor,
                        before_seq=before_seq,
                        after_seq=after_seq,
                        around=around,
                        limit=limit,
                        as_user=user,
                    ),
                ),
                one_statement=True,
            )

    async def search(
        self,
        user_id: uuid.UUID,
        query: str,
        *,
        room_id: uuid.UUID | None = None,
        author_id: uuid.UUID | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        order: SearchOrder = "newest",
        limit: int = DEFAULT_SEARCH_LIMIT,
        cursor: str | None = None,
    ) -> SearchPage:
        """Full-text search over the messages the user may see, newest first or ranked.

        Row security applies: only messages of the user's rooms are found. Filters: one
        room, one author, ``since`` (inclusive) and ``until`` (exclusive). Each hit has a
        highlighted ``snippet`` (:class:`~chatkeep.models.SearchHit`); ``page.next``
        continues the same search. A query is parsed by ``websearch_to_tsquery``: any text
        is safe, operators and all; one with no words gives an empty page, and so does a
        room the user is not in.

        Raises:
            InvalidInput: a bad id, an empty, too long (> 256 characters) or too wordy
                (> 32 terms) query, a naive datetime, ``since`` not before ``until``, an
                unknown ``order``, ``limit`` outside 1-100, or a cursor that is malformed or
                from another search.
            ConfigurationError: ``search_config`` names no text search configuration.
        """
        async with self._flow("search", after_commit=False) as flow:
            user = check_id("user_id", user_id)
            flow.about(user_id=user)
            async with flow.acting_as(user):
                return await self.search_index.search(
                    user,
                    query,
                    room_id=room_id,
                    author_id=author_id,
                    since=since,
                    until=until,
                    order=order,
                    limit=limit,
                    cursor=cursor,
                )

    async def rooms_of(
        self, user_id: uuid.UUID, *, include_inactive: bool = False
    ) -> list[RoomSummary]:
        """The user's rooms, newest activity first, with last message and unread count.

        Raises:
            NotFound: no such user.
            InvalidInput: a bad id.
        """
        async with self._flow("rooms_of", after_commit=False, reads=True) as flow:
            user = check_id("user_id", user_id)
            return await flow.read_as(
                user,
                lambda: self.rooms.rooms_of(user, include_inactive=include_inactive, as_user=user),
                one_statement=True,
            )

    # -- rooms and membership ---------------------------------------------------------------

    async def create_room(self, dto: CreateRoomDto) -> Room:
        """Create a public or private room; its creator becomes its owner.

        Raises:
            NotFound: ``created_by`` is not a user.
            InvalidInput: ``dto`` is not a CreateRoomDto.
        """
        async with self._flow("create_room", after_commit=False) as flow:
            if not isinstance(dto, CreateRoomDto):
                raise InvalidInput("dto", "must be a CreateRoomDto")
            # A new id: no member list of it can be cached, so there is nothing to invalidate.
            async with flow.acting_as(dto.created_by):
                return await self.rooms.create(dto)

    async def open_direct(self, user_a: uuid.UUID, user_b: uuid.UUID) -> Room:
        """The direct room of two users, created on first use (both become members).

        Raises:
            NotFound: either user does not exist.
            InvalidInput: a bad id.
        """
        async with self._flow("open_direct", after_commit=False) as flow:
            opener = check_id("user_a", user_a)
            async with flow.acting_as(opener):
                return await self.rooms.open_direct(opener, user_b)

    async def join(
        self,
        room_id: uuid.UUID,
        user_id: uuid.UUID,
        *,
        role: RoomRole = "member",
        by: uuid.UUID | None = None,
    ) -> RoomUser:
        """Add a member (``by`` defaults to the user: a self-join of a public room).

        Persists, invalidates the membership cache, publishes ``member.joined``.
        Joining again returns the existing membership unchanged.

        Raises:
            NotFound: the room or the user does not exist, or ``by`` cannot see the room
                (a private room, to someone not in it).
            PermissionDenied: ``by`` may not add this member with this role.
            InvalidInput: a bad id or role, or a direct room.
        """
        async with self._flow("join") as flow:
            room = check_id("room_id", room_id)
            user = check_id("user_id", user_id)
            flow.about(room_id=room, user_id=user)
            actor = user if by is None else check_id("by", by)
            # One round trip as the actor (migration 022), the room row locked first.
            with flow.as_user(actor, hide="room"), self._writing(actor, flow):
                member, position = await self.rooms.join_as(room, user, role=role, by=actor)
            flow.one_round_trip()
            flow.invalidate_members(room)
            flow.publish(
                MemberJoined(room_id=room, user_id=user, role=member.role, position=position)
            )
        return member

    async def leave(
        self, room_id: uuid.UUID, user_id: uuid.UUID, *, by: uuid.UUID | None = None
    ) -> bool:
        """Remove a member (``by`` defaults to the user: leaving).

        Persists, invalidates the membership cache, drops the user's presence and
        typing indicator in the room, publishes ``member.left``.

        Returns:
            False if the user was not a member (nothing is published then).

        Raises:
            PermissionDenied: ``by`` may not remove this member, or it is the last owner.
            NotFound: no such room, or one ``by`` cannot see (``room not found``).
            InvalidInput: a bad id, or a direct room.
        """
        async with self._flow("leave") as flow:
            room = check_id("room_id", room_id)
            user = check_id("user_id", user_id)
            flow.about(room_id=room, user_id=user)
            actor = user if by is None else check_id("by", by)
            with flow.as_user(actor, hide="room"), self._writing(actor, flow):
                removed, position = await self.rooms.remove_member_as(room, user, by=actor)
            if not removed:
                return False
            flow.one_round_trip()
            flow.invalidate_members(room)
            flow.left_room(room, user)
            flow.publish(MemberLeft(room_id=room, user_id=user, position=position))
        return True

    async def remove_member(self, room_id: uuid.UUID, user_id: uuid.UUID, *, by: uuid.UUID) -> bool:
        """Remove someone else from a room (an owner or admin's act); see :meth:`leave`.

        Raises:
            PermissionDenied: ``by`` may not remove this member, or it is the last owner.
            NotFound: no such room, or one ``by`` cannot see (``room not found``).
            InvalidInput: a bad id, or a direct room.
        """
        return await self.leave(room_id, user_id, by=check_id("by", by))

    async def change_role(
        self,
        room_id: uuid.UUID,
        user_id: uuid.UUID,
        role: RoomRole,
        *,
        by: uuid.UUID | None = None,
    ) -> RoomUser:
        """Give a member another role; publishes ``member.role_changed`` with the new role.

        Invalidates the membership cache too, although it holds ids only today, so a
        cache that grows roles later cannot be left stale by this path.

        Raises:
            NotFound: the user is not a member (or the room does not exist).
            PermissionDenied: ``by`` may not make this change, or it would leave no owner.
            InvalidInput: a bad id or role, or a direct room.
        """
        async with self._flow("change_role") as flow:
            room = check_id("room_id", room_id)
            user = check_id("user_id", user_id)
            flow.about(room_id=room, user_id=user)
            actor = None if by is None else check_id("by", by)
            if actor is None:
                # System work: no acting user, so not the acting user's function.
                async with flow.acting_as(actor, hide="room"):
                    member = await self.rooms.change_role(room, user, role, by=actor)
                    position = await self.change_log.last_position()
            else:
                with flow.as_user(actor, hide="room"), self._writing(actor, flow):
                    member, position = await self.rooms.change_role_as(room, user, role, by=actor)
            flow.one_round_trip()
            flow.invalidate_members(room)
            flow.publish(
                MemberRoleChanged(room_id=room, user_id=user, role=member.role, position=position)
            )
        return member

    async def delete_room(self, room_id: uuid.UUID, *, by: uuid.UUID | None = None) -> bool:
        """Delete a room with its messages and memberships (an owner's act).

        Invalidates the membership cache and publishes ``member.left`` for every member
        who was in it, so each node drops the room.

        Args:
            room_id: the room.
            by: the acting user, who must be an owner (``None``: the system).

        Returns:
            False if there was no such room.

        Raises:
            PermissionDenied: ``by`` is not an owner of the room.
            InvalidInput: a bad id.
            Unavailable: a concurrent membership change won a race; retry.
        """
        async with self._flow("delete_room") as flow:
            room = check_id("room_id", room_id)
            flow.about(room_id=room)
            actor = None if by is None else check_id("by", by)
            # Serializable: the owner check and the delete see one snapshot, and a concurrent
            # role change or join makes one side fail (Unavailable) instead of slipping past.
            async with flow.acting_as(actor, isolation="serializable"):
                try:
                    found = await self.rooms.members(room)
                except NotFound:
                    return False
                roles = {member.user.id: member.role for member in found.members}
                if actor is not None and roles.get(actor) != "owner":
                    raise PermissionDenied("only an owner may delete the room")
                if not await self.rooms.delete(room):  # pragma: no cover - the snapshot saw it
                    return False
            flow.invalidate_members(room)
            flow.publish(*(MemberLeft(room_id=room, user_id=user) for user in roles))
        return True

    # -- sockets, presence, typing ----------------------------------------------------------

    async def connect_socket(
        self, user_id: uuid.UUID, socket_id: str, *, rooms: Iterable[uuid.UUID] = ()
    ) -> bool:
        """Map a new socket to its user and this node, and mark the user online in ``rooms``.

        Returns:
            True when the user just came online (their first socket); then a
            ``presence`` event goes to each of ``rooms``.

        Raises:
            PermissionDenied: the user is not a member of one of ``rooms`` (a public one).
            NotFound: one of ``rooms`` does not exist or the user cannot see it
                (``room not found``).
            InvalidInput: a bad id.
            Unavailable: Redis could not be reached.
        """
        async with self._flow("connect_socket", after_commit=False) as flow:
            user = check_id("user_id", user_id)
            flow.about(user_id=user)
            room_set = _ids("rooms", rooms)
            for room in room_set:
                await self._require_member(room, user)
            came_online = await self.presence.connect(user, socket_id, rooms=room_set)
            if came_online:
                flow.publish(
                    *(PresenceChanged(room_id=r, user_id=user, status="online") for r in room_set)
                )
        return came_online

    async def heartbeat(
        self, user_id: uuid.UUID, socket_id: str, *, rooms: Iterable[uuid.UUID] = ()
    ) -> bool:
        """Keep a socket (and its user) alive; call every ``presence_timeout / 3`` s or so.

        Heartbeats write nothing to PostgreSQL (``last_seen`` is written once, when the
        user goes offline). Rooms the user is no longer a member of are left out, so a
        removed member's client cannot keep showing them present.

        Returns:
            True if the user had been considered offline and is online again (then a
            ``presence`` event goes to their rooms).

        Raises:
            InvalidInput: a bad id.
            Unavailable: Redis could not be reached.
        """
        async with self._flow("heartbeat", after_commit=False) as flow:
            user = check_id("user_id", user_id)
            flow.about(user_id=user)
            room_set = _ids("rooms", rooms)
            kept: set[uuid.UUID] = set()
            for room in room_set:
                with contextlib.suppress(NotFound):
                    if await self.members.is_member(room, user):
                        kept.add(room)
            back = await self.presence.heartbeat(user, socket_id, rooms=kept)
            if back:
                flow.publish(
                    *(PresenceChanged(room_id=r, user_id=user, status="online") for r in kept)
                )
        return back

    async def disconnect_socket(
        self, socket_id: str, *, rooms: Iterable[uuid.UUID] = ()
    ) -> OfflineUser | None:
        """Drop a socket; if it was its user's last, write last_seen and publish offline.

        Args:
            socket_id: the socket.
            rooms: rooms to tell of the user going offline, besides the ones the socket
                was registered in.

        Returns:
            The user who went offline, or ``None`` if they are still online elsewhere
            (or the socket was unknown).

        Raises:
            InvalidInput: a bad id.
            Unavailable: Redis could not be reached.
        """
        async with self._flow("disconnect_socket", after_commit=False) as flow:
            room_set = _ids("rooms", rooms)
            info = await self.sockets.get(socket_id)
            if info is not None:
                room_set |= info.rooms
            gone = await self.presence.disconnect(socket_id)
            if gone is not None:
                flow.publish(
                    *(
                        PresenceChanged(
                            room_id=r,
                            user_id=gone.user_id,
                            status="offline",
                            last_seen=gone.last_seen,
                        )
                        for r in room_set
                    )
                )
        return gone

    async def sweep_presence(self) -> list[OfflineUser]:
        """Take users whose sockets stopped heartbeating offline (writes their last_seen).

        Call it every few seconds from any node (``chat.presence.run_sweeper()`` does it
        in a loop); each user is reported by exactly one call.

        Raises:
            Unavailable: Redis could not be reached.
        """
        return await self.presence.sweep()

    async def set_typing(self, room_id: uuid.UUID, user_id: uuid.UUID, typing: bool = True) -> None:
        """Start (or stop) a typing indicator of a member; it expires by itself.

        Raises:
            PermissionDenied: the user is not a member of a public room.
            NotFound: no such room, or one the user cannot see (``room not found``).
            InvalidInput: a bad id.
            Unavailable: Redis could not be reached.
        """
        async with self._flow("set_typing", after_commit=False) as flow:
            room = check_id("room_id", room_id)
            user = check_id("user_id", user_id)
            flow.about(room_id=room, user_id=user)
            if not isinstance(typing, bool):
                raise InvalidInput("typing", "must be a bool")
            await self._require_member(room, user)
            if typing:
                await self.typing.start(room, user)
            else:
                await self.typing.stop(room, user)
            flow.publish(TypingChanged(room_id=room, user_id=user, typing=typing))

    async def subscribe(self, *room_ids: uuid.UUID) -> EventSubscription:
        """Subscribe to the events of ``room_ids`` (see :class:`~chatkeep.realtime.EventBus`).

        On a :class:`~chatkeep.realtime.RoomGap`, call :meth:`catch_up` from the last
        ``seq`` seen in each room.

        Raises:
            InvalidInput: no room, or a bad id.
            Unavailable: Redis could not be reached.
        """
        return await self.events.subscribe(*(check_id("room_ids", r) for r in room_ids))

    def stream(
        self,
        room_ids: Iterable[uuid.UUID],
        user_id: uuid.UUID,
        *,
        since: Mapping[uuid.UUID, int] | None = None,
    ) -> ChangeStream:
        """Every change of ``room_ids`` the user can see, caught up and then live.

        Open it with ``async with`` (that is what releases its subscription, whatever way
        the loop ends) and iterate it::

            async with chat.stream(rooms, user_id, since=positions) as stream:
                async for item in stream:
                    ...  # a Change, a RoomReset or a RoomClosed

        It subscribes first, then reads each room's log after ``since[room]`` (a room
        absent from ``since`` starts at its current position: no history replay), drops
        what it already handed out, yields changes in position order per room, and reads
        the log again by itself after any gap (see :mod:`chatkeep.stream`). Identical
        concurrent reads of a room by this process's streams share one query (each
        caller's membership is still checked). ``stream.positions`` is what to pass as
        ``since`` to resume.

        Raises:
            InvalidInput: a bad id, or ``since`` naming another room or a bad position
                (at once); ``NotFound`` (a room the user is not in) and ``Unavailable``
                come from ``async with``.
        """
        return ChangeStream(_StreamSource(self), room_ids, user_id, since=since)

    async def _shared_changes(
        self, room: uuid.UUID, user: uuid.UUID, *, after: int, limit: int, not_before: float
    ) -> ChangePage:
        """:meth:`changes`, sharing identical concurrent reads of a room in this process.

        The log a member reads does not depend on which member reads it, so after this
        caller's own membership check it may take the page of a read another stream
        started after ``not_before`` (this caller's subscription, on the loop's clock). A
        read that started earlier (still in flight, or finished lately) is taken only when
        the room's published mark, read after the subscription, shows nothing past its
        page (see :meth:`_page_still_whole`): otherwise its snapshot could predate a change
        whose event came before the subscription, and the stream would miss it.
        """
        await self._require_member_or_hide(room, user)
        key = (room, after, limit)
        found = self._change_reads.get(key)
        if found is not None:
            try:
                page = await asyncio.shield(found[1])
            except NotFound:
                # The leading reader's own membership ended meanwhile: read as this caller.
                return await self.changes(room, user, after=after, limit=limit)
            except ChatkeepError:
                if found[0] >= not_before:
                    raise  # its failure is this caller's too
                page = None  # an older read failed: read for this caller
            if page is not None and (
                found[0] >= not_before or await self._page_still_whole(room, page, not_before)
            ):
                return page
        else:
            recent = self._recent_changes.get(key)
            if recent is not None:
                if asyncio.get_running_loop().time() - recent[0] > _RECENT_CHANGE_SECONDS:
                    del self._recent_changes[key]
                elif await self._page_still_whole(room, recent[1], not_before):
                    return recent[1]
        flight = asyncio.ensure_future(self.changes(room, user, after=after, limit=limit))
        entry = (asyncio.get_running_loop().time(), flight)
        self._change_reads[key] = entry
        flight.add_done_callback(lambda done: self._read_done(key, entry))
        return await asyncio.shield(flight)

    def _read_done(
        self,
        key: tuple[uuid.UUID, int, int],
        entry: tuple[float, asyncio.Future[ChangePage]],
    ) -> None:
        if self._change_reads.get(key) is entry:
            del self._change_reads[key]
        done = entry[1]
        if done.cancelled() or done.exception() is not None:
            return  # (the exception is retrieved: a cancelled reader never awaits it)
        self._recent_changes[key] = (asyncio.get_running_loop().time(), done.result())
        self._recent_changes.move_to_end(key)
        while len(self._recent_changes) > _RECENT_CHANGE_PAGES:
            self._recent_changes.popitem(last=False)

    async def _page_still_whole(self, room: uuid.UUID, page: ChangePage, not_before: float) -> bool:
        """Whether a page read before a stream subscribed (at ``not_before``) serves it.

        The writers raise the room's published mark *before* they publish (in one
        pipeline), so a mark read now, after the subscription, at or below the page's
        position means every later change is published after the subscription: the
        stream receives it, or the relay's notice of it. No mark at all (Redis lost it, or
        never had one) proves nothing. A page with a next page is a closed range of
        positions, whole whenever it was read: the stream reads what follows it afterwards
        (a message's content in it may be older than a later edit, which that later read
        brings).
        """
        if page.next_after is not None:
            return True
        if not_before > asyncio.get_running_loop().time():
            return False
        try:
            mark = await self.events.published(room)
        except Unavailable:
            return False
        return 0 < mark <= page.position

    # -- background work: the presence sweeper and the outbox relay -------------------------

    async def run_relay(
        self,
        *,
        database_url: str | None = None,
        interval: float = 0.1,
        grace: float = 0.25,
        standby_interval: float = 1.0,
    ) -> None:
        """Run the outbox relay forever (as a task; cancel it to stop).

        Every process may run one: a PostgreSQL advisory lock makes one of them the
        leader, the others stand by (see :mod:`chatkeep.relay`). :meth:`background`
        starts it with the presence sweeper.

        Args:
            database_url: a URL whose role sees every room (default:
                ``Settings.relay_database_url``, else this facade's own URL, which works
                only when its role is not ``chatapp_app``).
            interval: seconds between the leader's rounds.
            grace: seconds a change may stay unannounced before the relay announces it.
            standby_interval: seconds between a standby's attempts to lead.

        Raises:
            ConfigurationError: the relay's role is ``chatapp_app``, or its credentials
                are wrong.
            InvalidInput: a timing option is out of range.
        """
        settings = self.db.settings
        if database_url is None:
            configured = settings.relay_database_url
            database_url = self.db.dsn if configured is None else configured.get_secret_value()
        elif not isinstance(database_url, str) or not database_url.startswith(
            ("postgresql://", "postgres://")
        ):
            raise InvalidInput("database_url", "must be a postgresql:// URL")
        relay = OutboxRelay(
            self.events,
            self.redis,
            settings,
            database_url,
            interval=interval,
            grace=grace,
            standby_interval=standby_interval,
        )
        self.relay = relay
        await relay.run()

    @contextlib.asynccontextmanager
    async def background(
        self, *, relay: bool = True, sweep_interval: float = 5.0
    ) -> AsyncIterator[None]:
        """Run the presence sweeper and the outbox relay while the block runs.

        One line in an application's lifespan::

            async with ChatKeep.connect() as chat, chat.background():
                yield  # serve

        The tasks are cancelled (and awaited) when the block ends. A task that stops on
        an error (a relay refused its role, say) logs it at ERROR; the other keeps going.

        Args:
            relay: also run :meth:`run_relay` with its defaults.
            sweep_interval: seconds between presence sweeps.

        Raises:
            InvalidInput: ``sweep_interval`` is out of range (0.01 to 3600 s).
        """
        if isinstance(sweep_interval, bool) or not isinstance(sweep_interval, int | float):
            raise InvalidInput("sweep_interval", "must be a number of seconds")
        if not 0.01 <= sweep_interval <= 3600.0:
            raise InvalidInput("sweep_interval", "must be from 0.01 to 3600 seconds")
        tasks = [
            asyncio.create_task(
                self.presence.run_sweeper(sweep_interval), name="chatkeep-presence-sweeper"
            )
        ]
        if relay:
            tasks.append(asyncio.create_task(self.run_relay(), name="chatkeep-relay"))
        for task in tasks:
            task.add_done_callback(_log_failure)
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def health(self) -> Health:
        """Latency and state of both stores.

        Raises:
            Unavailable: PostgreSQL cannot be reached (Redis's state is in ``redis``).
        """
        return Health(database=await self.db.health(), redis=await self.redis.health())
