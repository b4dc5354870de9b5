"""`python -m diffusion_lit.cli ...` is `lit-ddpm ...`."""

from diffusion_lit.cli import main

main()
