"""Run one real vLLM engine in a child process and dump what the tests need as JSON.

Tests start engines through this script (not in the pytest process) so that each engine gets
its own environment (tensor parallel needs its own OpenMP binding) and is torn down cleanly.

    python tests/support/vllm_runner.py SPEC.json OUT.json

SPEC: {"model": path, "llm_kwargs": {...}, "prompts": [str | [token ids]], "max_tokens": 16,
       "logprobs": 5, "lora": [{"name", "id", "path"} | null per prompt] (optional),
       "dump_qahira": path.safetensors (optional; TP=1 in-process engine only),
       "solo": true (optional: every request again, alone)}
OUT:  {"outputs": [{"token_ids": [...], "text": str,
                    "first_logprobs": {token_id: logprob}}], "seconds_startup": float,
       "qahira_kernels": {vLLM module name: kernel name} (with dump_qahira),
       "solo_outputs": [...] (with solo, as "outputs")}

dump_qahira writes the qweight / scales / offsets of every module served by a qahira kernel,
as "<vLLM module name>.<tensor>", for kernels that keep them as stored (cpu_blockwise,
dequant_torch's qweight; e.g. at fp32); it needs the model in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0, the uni executor: what tests/engine.py sets at TP=1).
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
    result = {"seconds_startup": startup, "outputs": [_dump(o) for o in outs]}
    if spec.get("solo"):  # the same requests again, one generate call each
        result["solo_outputs"] = [
            _dump(llm.generate([p], params, use_tqdm=False,
                               lora_request=lora_requests[i] if lora_requests else None)[0])
            for i, p in enumerate(prompts)]
    if spec.get("dump_qahira"):
        result["qahira_kernels"] = _dump_qahira(llm, spec["dump_qahira"])
    json.dump(result, open(out_path, "w"))


def _dump(out) -> dict:
    c = out.outputs[0]
    first = {str(k): v.logprob for k, v in c.logprobs[0].items()} if c.logprobs else {}
    return {"token_ids": list(c.token_ids), "text": c.text, "first_logprobs": first}


def _dump_qahira(llm, path: str) -> dict:
    from safetensors.torch import save_file

    model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    tensors, kernels = {}, {}
    for name, module in model.named_modules():
        kernel = getattr(module, "qahira_kernel", None)
        if kernel is None or name.endswith(".base_layer"):
            # with LoRA enabled the wrapper forwards its base_layer's attributes (vLLM's
            # BaseLayerWithLoRA.__getattr__): dumped once, under the wrapper's (the served) name
            continue
        kernels[name] = kernel.name
        for t in ("qweight", "scales", "offsets"):
            if hasattr(module, t):
                tensors[f"{name}.{t}"] = getattr(module, t).detach().cpu().contiguous()
    save_file(tensors, path)
    return kernels


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
