"""Running the command line from async tests."""

from __future__ import annotations

import asyncio
import logging

from typer.testing import CliRunner

from chatkeep.cli import app


async def invoke(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """Run ``chatkeep ARGS`` in a thread (it runs its own event loop, as from a shell).

    Returns the exit code, all output and stderr alone, with whitespace runs made one space in
    the first. The root logger, which the command reconfigures, is put back afterwards.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        result = await asyncio.to_thread(CliRunner().invoke, app, args, env=env)
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)
    return result.exit_code, " ".join(result.output.split()), result.stderr
