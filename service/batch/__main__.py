"""``python -m service.batch`` → ``python -m service.jobs`` (old name)."""

import sys

from service.jobs.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
