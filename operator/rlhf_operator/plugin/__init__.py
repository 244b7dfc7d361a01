"""`kubectl rlhf`: a kubectl plugin to watch RLHFJobs (console script `kubectl-rlhf`).

Pure modules (`summary`, `hints`, `render`, `fmt`) turn API objects into text or JSON; `kube`
does the reads; `cli` wires them to the command line.
"""

from rlhf_operator.plugin.cli import main

__all__ = ["main"]
