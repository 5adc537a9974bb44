"""PostgreSQL: connections, migrations and one repository per entity.

::

    from chatkeep.storage import Database, MessageRepository

    async with Database(settings) as db:
        messages = MessageRepository(db)
        page = await messages.history(room_id)
"""

from chatkeep.storage.base import BaseRepository
from chatkeep.storage.database import Database, DatabaseHealth, OperationStats, Transaction
from chatkeep.storage.messages import MessageRepository
from chatkeep.storage.rooms import RoomRepository
from chatkeep.storage.threads import ThreadRepository
from chatkeep.storage.users import UserRepository

__all__ = [
    "BaseRepository",
    "Database",
    "DatabaseHealth",
    "MessageRepository",
    "OperationStats",
    "RoomRepository",
    "ThreadRepository",
    "Transaction",
    "UserRepository",
]
