"""Hub-style entry point: `model.generate(ids, custom_generate=<this repo>, trust_remote_code=True,
assistant_model=drafter)` runs hf_specssm's speculative decoding loop.

transformers calls `generate(model=..., **every generate argument)`; the drafter may be passed as
`assistant_model` or `drafter`.
"""

import hf_specssm


def generate(model, **kwargs):
    """Speculative decoding with `assistant_model` (or `drafter`) through hf_specssm."""
    drafter = kwargs.pop("drafter", None)
    assistant_model = kwargs.pop("assistant_model", None)
    if drafter is not None and assistant_model is not None:
        raise ValueError("pass the drafter once, as assistant_model or as drafter.")
    return hf_specssm.generate(model, drafter=drafter if drafter is not None else assistant_model, **kwargs)
