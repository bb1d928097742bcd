# Job array: task i runs sweep point i in its own directory; `hpcml sweep collect
# $RUNS/$NAME-<array job id>` gathers them.
case "${SLURM_ARRAY_TASK_ID}" in
{{cases}}
  *) echo "hpcml: no sweep point ${SLURM_ARRAY_TASK_ID}" >&2; exit 2 ;;
esac
POINT_DIR="$RUNS/$NAME-${SLURM_ARRAY_JOB_ID}/point-${SLURM_ARRAY_TASK_ID}"
run_hpcml "$POINT_DIR" "${SLURM_NTASKS}" "${POINT[@]}"
finish "$POINT_DIR" $?
