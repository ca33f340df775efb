"""Several processes as one run: the process group (session, barriers, shared decisions) and DDP."""
