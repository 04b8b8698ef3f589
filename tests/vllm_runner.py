"""Run one real vLLM engine in a child process and dump what the tests need as JSON.

Tests start engines through this script (not in the pytest process) so that each engine gets
its own environment (tensor parallel needs its own OpenMP binding) and is torn down cleanly.

    python tests/vllm_runner.py SPEC.json OUT.json

SPEC: {"model": path, "llm_kwargs": {...}, "prompts": [str | [token ids]], "max_tokens": 16,
       "logprobs": 5, "lora": [{"name", "id", "path"} | null per prompt] (optional)}
OUT:  {"outputs": [{"token_ids": [...], "text": str,
                    "first_logprobs": {token_id: logprob}}], "seconds_startup": float}
"""

import json
import sys
import time


def main(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams

    spec = json.load(open(spec_path))
    t0 = time.time()
    llm = LLM(spec["model"], **spec.get("llm_kwargs", {}))
    startup = time.time() - t0
    params = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 16),
                            logprobs=spec.get("logprobs", 5), ignore_eos=True)
    lora_requests = None
    if spec.get("lora"):
        from vllm.lora.request import LoRARequest

        lora_requests = [LoRARequest(r["name"], r["id"], r["path"]) if r else None
                         for r in spec["lora"]]
    # Prompts given as token id lists reach the model exactly as the reference sees them.
    prompts = [{"prompt_token_ids": p} if isinstance(p, list) else p for p in spec["prompts"]]
    outs = llm.generate(prompts, params, lora_request=lora_requests, use_tqdm=False)
    result = {"seconds_startup": startup, "outputs": []}
    for o in outs:
        c = o.outputs[0]
        first = {str(k): v.logprob for k, v in c.logprobs[0].items()} if c.logprobs else {}
        result["outputs"].append({"token_ids": list(c.token_ids), "text": c.text,
                                  "first_logprobs": first})
    json.dump(result, open(out_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
