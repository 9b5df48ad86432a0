"""jaxinfer: a JAX/XLA compiled LLM inference runtime for NVIDIA GPUs.

Two ways in: `generate()` (a static batch, one jitted program) and `LLM` / `Engine` (continuous
batching over a paged KV cache; see jaxinfer/engine.py for its step).

Data flow of `generate`: token ids -> prefill (one forward over the padded prompts, K/V written
into a preallocated cache) -> a `lax.while_loop` of decode steps (one token per row, sampled on
device) -> new token ids. Everything runs as one jitted program with the cache donated.

Shape letters, used in every einsum, annotation and shape comment:
  B batch          T query tokens      S key/value tokens   D model width
  N query heads    K kv heads          G query heads per kv head (N = K * G)
  H head dim       F mlp width         E experts            V vocab
  P pages          L page size
"""

from jaxinfer.checkpoint import load_model, save_checkpoint
from jaxinfer.config import ModelConfig
from jaxinfer.engine import LLM, Engine, EngineConfig, RequestOutput
from jaxinfer.generate import generate, stream
from jaxinfer.model import Model, forward, init_params
from jaxinfer.sampling import SamplingParams

__all__ = ["LLM", "Engine", "EngineConfig", "Model", "ModelConfig", "RequestOutput",
           "SamplingParams", "forward", "generate", "init_params", "load_model", "save_checkpoint",
           "stream"]
