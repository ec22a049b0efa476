"""Old name of :mod:`service.jobs` (the batch job), kept so ``python -m service.batch`` and
``python -m service.batch.ray_pipeline`` keep working."""
