"""Inputs of the golden files in tests/golden/ (regenerate them with scripts/regen_golden.py)."""
from __future__ import annotations

# SmolLM2-135M-Instruct's tokenizer.chat_template (ChatML with a default system prompt)
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
           "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
           "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Gemma 3's template, abridged to its turn markers (what the family detection keys on)
GEMMA3 = ("{{ bos_token }}{%- for message in loop_messages -%}{%- if (message['role'] == 'assistant') -%}"
          "{%- set role = \"model\" -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
          "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{%- endfor -%}"
          "{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}")
# A template of no known family
OTHER = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:"

CASES = {
    "chatml-smollm2": (SMOLLM2, {"num_ctx": 512, "num_batch": 64, "use_mmap": False}),
    "gemma3": (GEMMA3, {}),
    "unknown": (OTHER, {}),
    "no-template": (None, {}),
}
