"""What a model's tensors are, before anything is measured or planned: each tensor's role, layer and the
types llama.cpp will really write for it (``slots``), by rules mirrored from ``src/llama-quant.cpp``
(``rules``). Both measuring (``score/``) and planning (``plan/``) stand on it."""
