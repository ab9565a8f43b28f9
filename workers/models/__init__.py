"""Pure torch models: no I/O, no Celery, no database."""
