"""One module per strategy: its frozen config (what the user passes to ``parastep.apply``)
and the :class:`~parastep.strategies.base.Strategy` the config builds."""

from .base import Strategy, StrategyConfig
from .batchstep import BatchStepConfig
from .parastep import ParaStepConfig, ideal_speedup
from .sparsetem import SparseTemConfig

CONFIG_TYPES: tuple[type[StrategyConfig], ...] = (ParaStepConfig, BatchStepConfig, SparseTemConfig)

__all__ = ["CONFIG_TYPES", "BatchStepConfig", "ParaStepConfig", "Strategy", "StrategyConfig", "ideal_speedup"]
