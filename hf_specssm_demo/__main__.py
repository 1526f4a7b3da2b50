"""`python -m hf_specssm_demo`: the same as the `hf-specssm-demo` console script."""

from .cli import main

raise SystemExit(main())
