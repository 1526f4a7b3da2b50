"""Hub-style entry point: `model.generate(ids, custom_generate=<this folder or its Hub id>,
trust_remote_code=True, assistant_model=drafter)` runs hf_specssm's speculative decoding loop.

transformers calls `generate(model=..., **every generate argument)`; the drafter may be passed as
`assistant_model` or `drafter`, or left out for prompt lookup (`prompt_lookup_num_tokens=`).
"""

# transformers checks a recipe's top-level imports before running it and would answer a missing hf_specssm
# with `pip install hf_specssm`, a name no package index serves; it skips imports inside `try`, so the
# error below is the one users see, and it says how to install the package.
try:
    import hf_specssm
except ImportError as error:
    raise ImportError(
        "this custom_generate recipe runs hf_specssm's speculative decoding loop, and hf_specssm is not "
        "installed. hf_specssm is not on a package index: install it from its source "
        "(`pip install <path to the hf_specssm source>`), then call generate again."
    ) from error


def generate(model, **kwargs):
    """Speculative decoding with `assistant_model` (or `drafter`) through hf_specssm."""
    drafter = kwargs.pop("drafter", None)
    assistant_model = kwargs.pop("assistant_model", None)
    if drafter is not None and assistant_model is not None:
        raise ValueError("pass the drafter once, as assistant_model or as drafter.")
    return hf_specssm.generate(model, drafter=drafter if drafter is not None else assistant_model, **kwargs)
