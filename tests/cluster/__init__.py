"""Issue 16's multi-host fault bed and invariant checker (tests/cluster/test_chaos_fast.py, bench/chaos.py).

- `bed.py`: network namespaces (coordinator, S3, N agents) on a bridge, each host with a private mount
  namespace; real processes; faults (kill -9, partitions, clock steps, full disks, S3 outages).
- `workload.py`: the jobs (numbered log lines, evidence of where and when each execution ran, an
  artifact with its manifest) and the collection of what dstack reports about them.
- `invariants.py`: the checks that run after every scenario.
- `scenarios.py`: the scenarios themselves, shared by the fast test and the benchmark.
"""
