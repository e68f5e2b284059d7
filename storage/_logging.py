"""Imported first by the package: Alembic logs a line per plugin (at import) and per
connection at INFO, which would drown a CLI's output. Keep its warnings only, unless the
application chose a level for the "alembic" logger before importing storage."""

import logging

if logging.getLogger("alembic").level == logging.NOTSET:
    logging.getLogger("alembic").setLevel(logging.WARNING)
