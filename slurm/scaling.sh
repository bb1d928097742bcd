# Scaling series: the same job at P = {{ranks}} ranks inside one allocation, then the report.
SERIES="$RUNS/{{name}}-${SLURM_JOB_ID}"
rc=0
# Latency and bandwidth for the alpha-beta model: Allreduce only, at the largest P that has a
# core per rank (at least 2).
PB={{pmax}}
[ "$PB" -gt "${SLURM_CPUS_ON_NODE:-$PB}" ] && PB=$SLURM_CPUS_ON_NODE
[ "$PB" -lt 2 ] && PB=2
if [ ! -f "$SERIES/bench.done" ]; then
  run_ranks "$PB" "${HPCML[@]}" bench collectives --set "runs_dir=\"$SERIES/bench\"" \
    --set 'ops=["Allreduce"]' --set 'buffers=["numpy"]' --set max_bytes=1048576 \
    --set iterations=20 \
    && touch "$SERIES/bench.done"
fi
for P in {{ranks}}; do
  run_hpcml "$SERIES/p$P" "$P" || rc=$?
  [ "$preempted" = 1 ] && finish 0
done
"${HPCML[@]}" report scaling "$SERIES"/p*/*/ --bench "$SERIES"/bench/*/ --out "$SERIES/report" || rc=$?
finish $rc
