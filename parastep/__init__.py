"""ParaStep: step-parallel diffusion denoising for any diffusers pipeline.

Example::

    import parastep
    handle = parastep.apply(pipe, parastep.ParaStepConfig(warmup_steps=5))  # P = group size
    out = pipe(prompt, num_inference_steps=50)      # called exactly as before, on every rank
    print(handle.last_stats.model_calls)
    handle.remove()
"""

from .engine import Handle, apply
from .errors import CommError, ConfigError, ParaStepError, UnsupportedPipelineError, UnsupportedSchedulerError
from .registry import BLOCKS, FAMILIES, PipelineSpec, spec_for
from .stats import RunStats, StepRecord
from .strategies import (
    AsyncDiffConfig,
    BatchStepConfig,
    CFGParallelConfig,
    ParaStepConfig,
    Strategy,
    StrategyConfig,
    ideal_speedup,
)
from .strategies.sparsetem import SparseTemConfig, SparseTemStats

__all__ = [
    "BLOCKS",
    "FAMILIES",
    "AsyncDiffConfig",
    "BatchStepConfig",
    "CFGParallelConfig",
    "CommError",
    "ConfigError",
    "Handle",
    "ParaStepConfig",
    "ParaStepError",
    "PipelineSpec",
    "RunStats",
    "SparseTemConfig",
    "SparseTemStats",
    "StepRecord",
    "Strategy",
    "StrategyConfig",
    "UnsupportedPipelineError",
    "UnsupportedSchedulerError",
    "apply",
    "ideal_speedup",
    "spec_for",
]
