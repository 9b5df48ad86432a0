"""jaxinfer: a JAX/XLA compiled LLM inference runtime for NVIDIA GPUs.

Two ways in: `generate()` (a static batch, one jitted program) and `LLM` / `Engine` (continuous
batching over a paged KV cache; see jaxinfer/engine.py for its step).

Data flow of `generate`: token ids -> prefill (one forward over the padded prompts, K/V written
into a preallocated cache) -> a `lax.while_loop` of decode steps (one token per row, sampled on
device) -> new token ids. Everything runs as one jitted program with the cache donated.

Shape letters, used in every einsum, annotation and shape comment (one meaning each):
  B batch (sequences)   T query (new) tokens   S key/value tokens (a sequence so far)
  D model width         N query heads          K kv heads
  G query heads per kv head (N = K * G)        H head dim
  F mlp width           V vocab                E experts
  k experts per token (top-k)                  R routed rows (T * k, sorted by expert)
  I, O a grouped matmul's contraction and output widths (D and 2F for gate/up, F and D for down)
  P pages in the pool   L page size            W pages per sequence (a block table's width)
Sizes that are not dimensions of the model (layers, split_k, work items) are spelled out.
"""

from jaxinfer.checkpoint import load_model, save_checkpoint
from jaxinfer.config import ModelConfig
from jaxinfer.engine import LLM, Engine, EngineConfig, RequestOutput
from jaxinfer.generate import generate, stream
from jaxinfer.model import Model, forward, init_params
from jaxinfer.sampling import SamplingParams

__all__ = [
    "LLM",
    "Engine",
    "EngineConfig",
    "Model",
    "ModelConfig",
    "RequestOutput",
    "SamplingParams",
    "forward",
    "generate",
    "init_params",
    "load_model",
    "save_checkpoint",
    "stream",
]
