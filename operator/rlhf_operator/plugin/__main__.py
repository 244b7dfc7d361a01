"""`python -m rlhf_operator.plugin` (same as `kubectl rlhf`)."""

import sys

from rlhf_operator.plugin.cli import main

sys.exit(main())
