"""``python -m service.batch.ray_pipeline`` → ``python -m service.jobs.ray_pipeline`` (old name)."""

import sys

from service.jobs.ray_pipeline import main

if __name__ == "__main__":
    sys.exit(main())
