"""service.jobs: the batch job and the Ray pipeline, in process (no server, no Ray)."""
