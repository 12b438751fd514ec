"""One spawn of 3 gloo ranks shared by tests/test_asyncdiff.py and tests/test_cfg_parallel.py:
each spawned rank costs seconds of imports, more than the checks it runs."""

from __future__ import annotations

import functools

from tests.distributed import run_ranks


def _checks(rank: int) -> dict:
    """The 3-rank checks on every rank, then the 2-rank ones on ranks 0 and 1 while rank 2 is done."""
    import torch.distributed as dist

    from tests.test_asyncdiff import three_rank_checks, two_rank_checks
    from tests.test_cfg_parallel import cfg_rank

    pair = dist.new_group([0, 1])  # every rank takes part in creating it
    results = dict(three=three_rank_checks(rank))
    if rank < 2:
        results["two"] = two_rank_checks(rank, pair)
        results["cfg"] = cfg_rank(rank, pair)
    return results


@functools.cache
def spawned_ranks() -> list[dict]:
    """Each rank's results, by rank (spawned once per test session)."""
    return run_ranks(_checks, 3, timeout=600)
