"""A one-process stand-in for the communicator that :mod:`hpcml.checkpoint` takes (rank 0 of
1: barrier, gather and bcast are local), for checkpoint tests without MPI."""


class OneRank:
    rank, size = 0, 1

    def barrier(self) -> None:
        pass

    def gather(self, obj: object) -> list[object]:
        return [obj]

    def bcast(self, obj: object) -> object:
        return obj
