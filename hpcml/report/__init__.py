"""Reports built from finished run directories (no MPI)."""
