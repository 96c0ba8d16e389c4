"""The vLLM half of ``tests/test_vllm.py``, run by vLLM's own python (``.venv-vllm``).

    python tests/vllm_half.py SNIPPET.py RESULT.json

Runs the offline snippet of ``docs/hf-bundle.md`` as written (as ``__main__``, in the current
folder, where the main-env half left ``out/hf`` and ``prompt_embeds.safetensors``), then
writes the first generated position's top logprobs (token id -> logprob) and the text from
the ``outputs`` it produced. Imports nothing of mmconvert: vLLM's venv does not have it.
"""

from __future__ import annotations

import json
import runpy
import sys

if __name__ == "__main__":  # vLLM spawns its engine, which re-imports this file
    snippet, result = sys.argv[1], sys.argv[2]
    names = runpy.run_path(snippet, run_name="__main__")
    completion = names["outputs"][0].outputs[0]
    first = completion.logprobs[0]  # the distribution after the prompt
    with open(result, "w", encoding="utf-8") as f:
        json.dump({"text": completion.text, "token_ids": list(completion.token_ids),
                   "top_logprobs": {str(t): lp.logprob for t, lp in first.items()}}, f)
