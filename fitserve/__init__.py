"""fitserve: run and serve Llama-family models on the hardware you have, and measure them.

Public API (shaped like vLLM's):

    from fitserve import LLM, SamplingParams
    llm = LLM()  # the bundled model; or LLM("path/to/hf-model", dtype="bfloat16")
    out = llm.generate(["def fib(n):"], SamplingParams(max_tokens=32))
    print(out[0].outputs[0].text)
"""

import logging as _logging

from fitserve.config import EngineArgs
from fitserve.outputs import CompletionOutput, Logprob, RequestOutput
from fitserve.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineArgs", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
__version__ = "0.1.0"


def _configure_default_logging() -> None:
    """Start-up facts (model, dtype, KV capacity in tokens) reach the user of the Python API too,
    as vLLM's do; an application that configures the "fitserve" logger itself wins."""
    logger = _logging.getLogger("fitserve")
    if logger.handlers:
        return
    handler = _logging.StreamHandler()
    handler.setFormatter(_logging.Formatter("%(levelname)s fitserve: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(_logging.INFO)
    logger.propagate = False


_configure_default_logging()


def __getattr__(name: str):
    # The engine pulls in torch and transformers; import it only when asked for, so that
    # `fitserve bench --url ...` and `import fitserve.sampling_params` stay light.
    if name == "LLM":
        from fitserve.llm import LLM

        return LLM
    if name == "LLMEngine":
        from fitserve.engine.engine import LLMEngine

        return LLMEngine
    raise AttributeError(f"module 'fitserve' has no attribute {name!r}")
