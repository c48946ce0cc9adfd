"""``python -m fedlora.cli`` runs ``fedlora``."""

from fedlora.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
