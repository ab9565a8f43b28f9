"""Stage workers. ``celery -A workers worker -Q gpu`` finds the Celery app here.

Importing this package loads no model and no torch: models load lazily inside tasks.
"""

from workers.app import app

__all__ = ["app"]
