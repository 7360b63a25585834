"""``python -m ckptbridge`` and the ``ckptbridge`` command: the signal handlers go in before the command line is imported."""

import sys

from .io import signals as _signals


def run() -> int:
    """Run the command line; once it has ended, a signal ends the process silently with its usual status."""
    _signals.install_cli_handlers()  # already in where `python -m ckptbridge` imported the package
    from .cli import main

    try:
        return main()
    finally:
        _signals.default_handlers()


if __name__ == "__main__":
    sys.exit(run())
