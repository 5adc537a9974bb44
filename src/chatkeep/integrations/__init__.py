"""Glue between chatkeep and web frameworks; each module needs its framework installed.

* :mod:`chatkeep.integrations.fastapi` (``pip install chatkeep[fastapi]``): a lifespan,
  dependencies (the chat object, the logged-in user), exception handlers with one JSON
  error body, a ready-made router and a WebSocket stream of a room's events.
* :mod:`chatkeep.integrations.http`: chatkeep's errors as HTTP status, JSON body and
  headers, framework-free.
* :mod:`chatkeep.integrations.streams`: what a WebSocket handler sends, framework-free:
  every change of a user's rooms, or a room's live events.

The socket.io and aiohttp recipes are how-to pages (``docs/howto/``), tested in
``tests/integrations``: their glue is a few lines an application owns.
"""
