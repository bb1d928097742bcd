# Job array: task i runs sweep point i in its own directory; `hpcml sweep collect
# $RUNS/{{name}}-<array job id>` gathers them.
case "${SLURM_ARRAY_TASK_ID}" in
{{cases}}
  *) echo "hpcml: no sweep point ${SLURM_ARRAY_TASK_ID}" >&2; exit 2 ;;
esac
run_hpcml "$RUNS/{{name}}-${SLURM_ARRAY_JOB_ID}/point-${SLURM_ARRAY_TASK_ID}" "${SLURM_NTASKS}" "${POINT[@]}"
finish $?
