set -uo pipefail
# --- hpcml preamble (same in every template) --------------------------------------------------
# Every substituted value below is one shell-quoted word (hpcml refuses control characters).
PY={{python}}
HPCML=("$PY" -m hpcml)
JOB={{job}}
NAME={{name}}
SETS=({{sets}})
RUNS={{runs_dir}}
REQUEUE={{requeue}}
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
cd {{workdir}} || exit 1
echo "hpcml: job ${SLURM_JOB_ID:-?} on ${SLURM_JOB_NODELIST:-?}, restart ${SLURM_RESTART_COUNT:-0}"

# Signals. SIGUSR1 is preemption: Slurm sends it to this shell {{signal_seconds}} s before the
# time limit (--signal=B:USR1@{{signal_seconds}}; 0 = never), and so does `scancel --batch
# --signal=USR1`; this shell forwards it to the launcher, which passes it to every rank.
# `scancel --signal=USR1` without --batch signals the job steps only: the ranks get it, this
# shell does not. Either way hpcml checkpoints, exits and writes status "preempted" in the run's
# summary.json, and that status - not which signal this shell saw - makes the job requeue itself
# (same job id; the next start resumes). SIGTERM is the end: a plain `scancel` (or the time
# limit) sends it to this shell and every step, then SIGKILL; the ranks still checkpoint if they
# can, but the job is never requeued and starts no further run.
cancelled=0
child=
forward() { [ -n "$child" ] && kill -USR1 "$child" 2>/dev/null; }
trap forward USR1
trap 'cancelled=1; forward' TERM

# launch NRANKS ARGS...: replace this (background) subshell with the launcher, so that the
# signal forwarded to $child reaches the launcher itself.
launch() {
  local n=$1; shift
  exec {{launch}}
}

# run_ranks NRANKS ARGS...: run ARGS on NRANKS ranks in the background and wait for them, also
# across forwarded signals; returns their exit status (143 without starting once cancelled).
run_ranks() {
  local rc last
  [ "$cancelled" = 1 ] && return 143
  launch "$@" &
  child=$!
  wait "$child"; rc=$?
  while kill -0 "$child" 2>/dev/null; do wait "$child"; rc=$?; done
  wait "$child" 2>/dev/null; last=$?
  [ "$last" != 127 ] && rc=$last
  child=
  return $rc
}

# run_status DIR: the status in summary.json of the newest run under DIR ("complete",
# "preempted", "failed"), or nothing when there is no run or it wrote no summary.
run_status() {
  local prev
  prev=$(ls -d "$1"/*/ 2>/dev/null | tail -n 1)
  [ -n "$prev" ] && [ -f "$prev/summary.json" ] || return 0
  "$PY" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("status", ""))' \
    "$prev/summary.json" 2>/dev/null
}

# run_hpcml RUNS_SUBDIR NRANKS [--set ...]: run the job with its run directory under
# RUNS_SUBDIR; a requeued job resumes the run directory it left there when that holds a
# checkpoint (else it starts a new run: kinds without checkpoints start over, the preempted
# run's results stay); a complete one is skipped. RUNS_SUBDIR is absolute, so runs_dir=PATH
# is read as the plain string PATH whatever it holds.
run_hpcml() {
  local dir=$1 n=$2; shift 2
  local prev resume=()
  if [ "$(run_status "$dir")" = complete ]; then
    echo "hpcml: the run under $dir is complete; skipping"; return 0
  fi
  prev=$(ls -d "$dir"/*/ 2>/dev/null | tail -n 1)
  [ -n "$prev" ] && [ -f "$prev/checkpoint/latest" ] && resume=(--resume "$prev")
  mkdir -p "$dir"
  run_ranks "$n" "${HPCML[@]}" run "$JOB" "${SETS[@]}" --set "runs_dir=$dir" "$@" \
    "${resume[@]}"
}

# finish RUNS_SUBDIR RC: requeue the job when the run under RUNS_SUBDIR stopped preempted (its
# own summary.json says so), requeueing is on and the job was not cancelled; else exit with RC.
finish() {
  if [ "$cancelled" = 0 ] && [ "$REQUEUE" = 1 ] && [ "$(run_status "$1")" = preempted ]; then
    echo "hpcml: the run under $1 was preempted; requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "${SLURM_JOB_ID}" && exit 0
  fi
  exit "$2"
}
# --- end of preamble ----------------------------------------------------------------------------
