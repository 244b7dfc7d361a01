"""`python -m rlhf_trainer stage ...` (what a stage RayJob runs) and `... run job.yaml`."""

import sys

from rlhf_trainer.cli import main

sys.exit(main())
