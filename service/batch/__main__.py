"""``python -m service.batch`` → ``python -m service.jobs`` (old name)."""
import sys

from service.jobs.__main__ import main

sys.exit(main())
