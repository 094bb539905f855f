"""``python -m initserve_server``: the same entry point as the ``initserve-server`` console script."""

from initserve_server.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
