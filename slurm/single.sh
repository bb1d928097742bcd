# One hpcml run on the allocation's ranks.
run_hpcml "$RUNS/$NAME-${SLURM_JOB_ID}" "${SLURM_NTASKS}"
finish "$RUNS/$NAME-${SLURM_JOB_ID}" $?
