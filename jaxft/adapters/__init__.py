"""Adapters by name. Each member is a module with the same functions:

  DEFAULTS                         its config fields (`adapter.<field>`) and defaults
  init(key, frozen, spec, calib)   -> (frozen', trainable); only trainable is optimized
  logical_axes(model_axes, trainable, spec) -> (frozen axes, trainable axes)
  combine(frozen, trainable, spec) -> the params tree the model runs on (unmerged)
  linear_hook(spec)                -> the model's `linear(p, x, name, rng)` hook
  materialize(frozen, trainable, spec) / merge -> plain effective params (export)
  regularizer(frozen, trainable, spec) -> (loss, metrics)   optional (KaSA, PEGO, ...)

The low-rank family (lora ... pego) shares `lowrank.Member`; see that module for
how a member plugs in.
"""
from jaxft.adapters import base, full, halo, lowrank
from jaxft.adapters import lora, rslora, dora, pissa, milora
from jaxft.adapters import kasa, svfit, lora_xs, sltrain, dsee, pego, codyra, mixlora, sst
from jaxft.adapters import qlora, lq_lora, l4q, qalora, lora_ga, eva, corda, lora_sb  # part B
from jaxft.adapters import ssf, ia3, bottleneck, compacter, prompt, spectral, said  # part 2
from jaxft.adapters import monarch_adapter  # part 2
from jaxft.adapters import ept, polyhistor, levi  # part 2: prompt, hypernetwork, side network
from jaxft.adapters import spiel, hft, paca, s2ft, lt_sft  # sparse / masked deltas
from jaxft.adapters import grafting, compeft, light_peft, freezing  # selection / post-hoc (P2)
from jaxft.adapters.base import TargetError, count_params

ADAPTERS = {
    "full": full,
    "halo": halo,  # full fine-tuning through HALO's rotated low-precision GEMMs
    # low-rank family (jaxft/adapters/lowrank.py)
    "lora": lora,
    "rslora": rslora,
    "dora": dora,
    "pissa": pissa,
    "milora": milora,
    "kasa": kasa,
    "svfit": svfit,
    "lora_xs": lora_xs,
    "codyra": codyra,
    "dsee": dsee,
    "sltrain": sltrain,
    "pego": pego,
    "mixlora": mixlora,
    "sst": sst,  # spectral form U diag(S) V^T, sampled singular vectors per round
    # quantized bases and data-driven initialisers (part B)
    "qlora": qlora,
    "lq_lora": lq_lora,
    "l4q": l4q,
    "qalora": qalora,
    "lora_ga": lora_ga,
    "eva": eva,
    "corda": corda,
    "lora_sb": lora_sb,
    # feature-wise, bottleneck, prompt, spectral and structured members (docs/adapters_part2.md)
    "ssf": ssf,
    "ia3": ia3,
    "series_adapter": bottleneck.series,
    "parallel_adapter": bottleneck.parallel,
    "compacter": compacter,
    "prompt_tuning": prompt.prompt_tuning,
    "prefix_tuning": prompt.prefix_tuning,
    "fourierft": spectral.fourierft,
    "loca": spectral.loca,
    "said": said,
    "monarch": monarch_adapter,
    "ept": ept,
    "polyhistor": polyhistor,
    "levi": levi,
    # sparse and masked deltas (jaxft/adapters/sparse_delta.py, docs/adapters_sparse.md)
    "spiel": spiel,
    "hft": hft,
    "paca": paca,
    "s2ft": s2ft,
    "lt_sft": lt_sft,
    # selection and post-hoc sparse members (P2; docs/adapters_sparse.md)
    "grafting": grafting,
    "compeft": compeft,
    "light_peft": light_peft,
    "greentrainer": freezing.greentrainer,
    "slimfit": freezing.slimfit,
    "telly": freezing.telly,
}
DEFAULTS = {name: module.DEFAULTS for name, module in ADAPTERS.items()}
