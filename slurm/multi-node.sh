# One hpcml run across nodes: {{ntasks_per_node}} ranks per node, block placement.
srun --ntasks="$SLURM_NNODES" --ntasks-per-node=1 hostname | sort | uniq -c
run_hpcml "$RUNS/$NAME-${SLURM_JOB_ID}" "${SLURM_NTASKS}"
finish "$RUNS/$NAME-${SLURM_JOB_ID}" $?
