"""Per-workload energy, cost and CO2e (opt-in): who used each GPU, and what it cost and emitted.

cgroup.py tells a PID's workload, attribution.py splits a step exactly, nvml_processes.py lists a
GPU's processes, tracker.py wires it into the sampler (`attach`). See docs/workloads.md.
"""
