"""esrdistill: on-policy distillation of language models with Early Stopping Rollout (ESR)."""

__version__ = "0.1.0"

from esrdistill.config import Config, ConfigError, load_config  # noqa: E402

__all__ = ["Config", "ConfigError", "load_config", "__version__"]
