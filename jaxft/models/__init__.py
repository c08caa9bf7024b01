"""Models: pure `init` / `apply` / `logical_axes` modules, looked up by name.

  from jaxft import models
  model = models.MODELS['decoder']
  params = model.init(key, models.DecoderConfig())
"""
from jaxft.models import decoder
from jaxft.models.decoder import DecoderConfig

MODELS = {
    'decoder': decoder,
}
# Config fields (`model.<field>`) and defaults of each model, for configs and `jaxft list`.
DEFAULTS = {name: module.DEFAULTS for name, module in MODELS.items()}

__all__ = ['MODELS', 'DEFAULTS', 'DecoderConfig', 'decoder']
