"""End-to-end scenarios and benchmarks: several agents on their own network namespaces (their own
IP addresses), faults injected by killing, freezing and cutting off processes, and the checks of
DESIGN.md's invariants after every fault.

    python -m e2e.fault_matrix --quick     # a few cells of the fault x phase matrix
    python -m e2e.fault_matrix --full      # every cell
"""
