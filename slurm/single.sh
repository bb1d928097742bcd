# One hpcml run on the allocation's ranks.
run_hpcml "$RUNS/{{name}}-${SLURM_JOB_ID}" "${SLURM_NTASKS}"
finish $?
