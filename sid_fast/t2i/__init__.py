"""Text-to-image teachers (Stable Diffusion through diffusers and transformers) and SiD-LSG's numerics."""
