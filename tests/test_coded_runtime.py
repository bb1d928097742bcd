"""Master/worker erasure runtime: k-of-m rounds, late answers discarded, never misapplied."""

import numpy as np

from hpcml.coded.runtime import MPIMaster, SimulatedMaster, serve
from hpcml.comm import StragglerConfig, make_delay_model
from hpcml.testing import mpi_test

ROUNDS = 12


def echo(worker):
    """Reply = 2 * message + worker id, so the master can tell who answered what."""
    return lambda t, msg: 2.0 * msg + worker


def check_rounds(rt, m, k):
    for t in range(ROUNDS):
        msgs = [np.array([t * 10.0 + i, -t]) for i in range(m)]
        got = rt.round(t, msgs, k)
        assert len(got) == k
        for worker, payload in got.items():
            np.testing.assert_array_equal(payload, 2.0 * msgs[worker] + worker)


def slow_rank_one(size):
    cfg = StragglerConfig(kind="fixed", slow_ranks=[1], delay=0.3)
    return make_delay_model(cfg, max(size, 2))


def test_simulated_master_waits_for_k_and_discards_late():
    m, k = 4, 2
    delays = make_delay_model(StragglerConfig(kind="exponential", mean=0.01, seed=3))
    rt = SimulatedMaster([echo(i) for i in range(m)], delays)
    check_rounds(rt, m, k)
    assert rt.discarded > 0
    kth = [sorted(delays.delay(i + 1, t) for i in range(m))[k - 1] for t in range(ROUNDS)]
    assert rt.elapsed() >= sum(kth) - 1e-12
    slow = SimulatedMaster([echo(i) for i in range(m)], slow_rank_one(m + 1))
    check_rounds(slow, m, m - 1)
    assert slow.elapsed() == 0.0 and slow.discarded == 0
    slow.close()
    assert slow.discarded == 1


@mpi_test(ranks=[2, 3, 5])
def test_mpi_master_late_answers_never_applied_to_wrong_iteration(comm):
    """Rank 1 is 0.3 s slow, the master waits for k = m - 1: every answer rank 1 manages to
    send is late and discarded (exact accounting), every round gets k answers to its own
    iteration, and ``close`` leaves nothing in flight."""
    comm.set_delays(slow_rank_one(comm.size))
    m = comm.size - 1
    k = max(1, m - 1)
    answered = None
    if comm.rank == 0:
        rt = MPIMaster(comm, reply_len=2)
        check_rounds(rt, m, k)
        rt.close()
    else:
        answered = serve(comm, echo(comm.rank - 1), message_len=2)
        assert answered <= ROUNDS
    counts = comm.allgather(answered)
    if comm.rank == 0:
        assert rt.answered == ROUNDS * k
        if m > 1:
            assert rt.discarded == counts[1], (rt.discarded, counts)


@mpi_test(ranks=[3])
def test_worker_frozen_past_close_is_named_and_exits_cleanly_when_it_resumes(comm):
    """Worker rank 1 really freezes (SIGSTOP, the ``fault`` model) for 1.5 s at its first
    round; k = 1 of 2 so the master finishes every round with rank 2. ``close`` gives up on
    rank 1 after 0.3 s and names it; when rank 1 resumes it sends its late reply, finds the
    stop message, acknowledges and returns like rank 2: the job ends normally."""
    comm.set_delays(make_delay_model(StragglerConfig(kind="fault", slow_ranks=[1], freeze=1.5,
                                                     freeze_after=0, seed=1), comm.size))
    if comm.rank == 0:
        rt = MPIMaster(comm, reply_len=2, close_timeout=0.3)
        check_rounds(rt, 2, 1)
        rt.close()
        assert rt.unresponsive == [1]
    else:
        answered = serve(comm, echo(comm.rank - 1), message_len=2)
        assert answered <= ROUNDS
