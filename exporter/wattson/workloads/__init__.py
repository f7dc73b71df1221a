"""Per-workload energy, cost and CO2e (opt-in): who used each GPU, and what it cost and emitted.

The GPU backend lists each GPU's processes (gpu/nvml_processes.py); cgroup.py tells a PID's
workload, attribution.py splits a step exactly, tracker.py keeps the totals and publishes them as
immutable snapshots (snapshot.py), and `attach` wires it into the sampler. simulated_proc.py serves
the simulated jobs' /proc. See docs/workloads.md.
"""
