"""The example chat application: ``uvicorn examples.chat.app:app``."""
