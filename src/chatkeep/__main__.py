"""``python -m chatkeep``: the command-line tool, where the console script is not on PATH."""

from chatkeep.cli import main

if __name__ == "__main__":
    main()
