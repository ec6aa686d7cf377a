"""Benchmarks of ggufmix against llama.cpp's stock mixes (``ggufmix bench``)."""
