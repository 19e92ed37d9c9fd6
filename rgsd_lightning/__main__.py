"""``python -m rgsd_lightning`` is the ``rgsd`` command."""

from rgsd_lightning.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
