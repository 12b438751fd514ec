"""One module per strategy: its frozen config (what the user passes to ``parastep.apply``)
and the :class:`~parastep.strategies.base.Strategy` the config builds."""

from .asyncdiff import AsyncDiffConfig
from .base import Strategy, StrategyConfig
from .batchstep import BatchStepConfig
from .cfg_parallel import CFGParallelConfig
from .parastep import ParaStepConfig, ideal_speedup
from .sparsetem import SparseTemConfig

CONFIG_TYPES: tuple[type[StrategyConfig], ...] = (
    ParaStepConfig,
    BatchStepConfig,
    AsyncDiffConfig,
    CFGParallelConfig,
    SparseTemConfig,
)

__all__ = [
    "CONFIG_TYPES",
    "AsyncDiffConfig",
    "BatchStepConfig",
    "CFGParallelConfig",
    "ParaStepConfig",
    "SparseTemConfig",
    "Strategy",
    "StrategyConfig",
    "ideal_speedup",
]
