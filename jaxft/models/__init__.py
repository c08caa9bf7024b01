"""Models: pure `init` / `apply` / `logical_axes` modules, looked up by name.

  from jaxft import models
  model = models.MODELS['decoder']
  params = model.init(key, models.DecoderConfig())
"""
from jaxft.models import decoder
from jaxft.models import hyena
from jaxft.models.decoder import DecoderConfig

MODELS = {
    'decoder': decoder,
    'hyena': hyena,
}
# Config fields (`model.<field>`) and defaults of each model, for configs and `jaxft list`.
# `pretrained`: a registered name (`smollm2-135m-instruct`, `gemma3-270m`), a .gguf file or an
# HF checkpoint directory; when set, the architecture fields come from the checkpoint.
DEFAULTS = {name: {**module.DEFAULTS, 'pretrained': ''} for name, module in MODELS.items()}

__all__ = ['MODELS', 'DEFAULTS', 'DecoderConfig', 'decoder']
