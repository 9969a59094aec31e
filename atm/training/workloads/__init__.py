"""Reference workloads that reproduce the paper: user code that logs like users do."""
