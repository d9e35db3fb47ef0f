"""The agent: runs on each GPU host, dials out to the coordinator and executes the jobs it is given."""
