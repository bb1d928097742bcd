set -uo pipefail
# --- hpcml preamble (same in every template) --------------------------------------------------
HPCML=({{python}} -m hpcml)
JOB={{job}}
SETS=({{sets}})
RUNS={{runs_dir}}
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
cd {{workdir}}
echo "hpcml: job ${SLURM_JOB_ID:-?} on ${SLURM_JOB_NODELIST:-?}, restart ${SLURM_RESTART_COUNT:-0}"

# Preemption: Slurm sends SIGUSR1 to this shell {{signal_seconds}} s before the time limit
# (--signal=B:USR1@{{signal_seconds}}) and SIGTERM at it. Forward it to the launcher, which passes
# it to every rank; hpcml checkpoints, exits, and the job requeues itself (same job id).
preempted=0
child=
forward() { preempted=1; [ -n "$child" ] && kill -USR1 "$child" 2>/dev/null; }
trap forward USR1 TERM

# launch NRANKS ARGS...: replace this (background) subshell with the launcher, so that the
# signal forwarded to $child reaches the launcher itself.
launch() {
  local n=$1; shift
  exec {{launch}}
}

# run_ranks NRANKS ARGS...: run ARGS on NRANKS ranks in the background and wait for them, also
# across forwarded signals; returns their exit status.
run_ranks() {
  local rc last
  launch "$@" &
  child=$!
  wait "$child"; rc=$?
  while kill -0 "$child" 2>/dev/null; do wait "$child"; rc=$?; done
  wait "$child" 2>/dev/null; last=$?
  [ "$last" != 127 ] && rc=$last
  child=
  return $rc
}

# run_hpcml RUNS_SUBDIR NRANKS [--set ...]: run the job with its run directory under
# RUNS_SUBDIR; a requeued job resumes the run directory it left there when that holds a
# checkpoint (else it starts a new run: kinds without checkpoints start over, the preempted
# run's results stay); a finished one is skipped.
run_hpcml() {
  local dir=$1 n=$2; shift 2
  local prev resume=()
  prev=$(ls -d "$dir"/*/ 2>/dev/null | tail -n 1)
  if [ -n "$prev" ] && grep -qs '"status": "complete"' "$prev/summary.json"; then
    echo "hpcml: $prev is complete; skipping"; return 0
  fi
  [ -n "$prev" ] && [ -f "$prev/checkpoint/latest" ] && resume=(--resume "$prev")
  mkdir -p "$dir"
  run_ranks "$n" "${HPCML[@]}" run "$JOB" "${SETS[@]}" --set "runs_dir=\"$dir\"" "$@" \
    "${resume[@]}"
}

# finish RC: requeue after a preemption (the next start resumes), else exit with RC.
finish() {
  if [ "$preempted" = 1 ] && [ "{{requeue}}" = 1 ]; then
    echo "hpcml: preempted; requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "${SLURM_JOB_ID}"
    exit 0
  fi
  exit "$1"
}
# --- end of preamble ----------------------------------------------------------------------------
