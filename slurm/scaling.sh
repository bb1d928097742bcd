# Scaling series: the same job at P = {{ranks}} ranks inside one allocation, then the report.
SERIES="$RUNS/$NAME-${SLURM_JOB_ID}"
rc=0
# stage_done DIR: end the series when the job was cancelled or the run under DIR was preempted
# (finish requeues after a preemption; the next start skips the complete runs, resumes this one).
stage_done() {
  if [ "$cancelled" = 1 ] || [ "$(run_status "$1")" = preempted ]; then finish "$1" "$rc"; fi
}
# Latency and bandwidth for the alpha-beta model: Allreduce only, at the largest P that has a
# core per rank (at least 2).
PB={{pmax}}
[ "$PB" -gt "${SLURM_CPUS_ON_NODE:-$PB}" ] && PB=$SLURM_CPUS_ON_NODE
[ "$PB" -lt 2 ] && PB=2
if [ ! -f "$SERIES/bench.done" ]; then
  run_ranks "$PB" "${HPCML[@]}" bench collectives --set "runs_dir=$SERIES/bench" \
    --set 'ops=["Allreduce"]' --set 'buffers=["numpy"]' --set max_bytes=1048576 \
    --set iterations=20 || rc=$?
  stage_done "$SERIES/bench"
  [ "$rc" = 0 ] && touch "$SERIES/bench.done"
fi
for P in {{ranks}}; do
  run_hpcml "$SERIES/p$P" "$P" || rc=$?
  stage_done "$SERIES/p$P"
done
"${HPCML[@]}" report scaling "$SERIES"/p*/*/ --bench "$SERIES"/bench/*/ --out "$SERIES/report" || rc=$?
exit $rc
