"""`qahira serve` with SmolLM2-135M quantized to INT4, over HTTP on 127.0.0.1, via `openai`.

The server runs in bf16 (vLLM's CPU default), so it exercises cpu_measured and the kernels it
picks per batch size (cpu_int4, cpu_dequant_gemm, ...).
Perplexity bound (from the issue): INT4 served perplexity <= 1.10 x the bf16 model's
perplexity on the same held-out text (bf16 weights, computed by transformers in fp32).
"""

from __future__ import annotations

import math

import pytest
import torch

from support.engine import KV_CACHE_BYTES
from support.server import qahira_server
from qahira_vllm.linear_kernels.cpu_measured import M_BUCKETS

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def int4_server(smollm2_quantized, tmp_path_factory):
    # 1x32: the embedded SmolLM2 weights come from a Q4_1 GGUF whose 32-wide asymmetric
    # blocks this block shape reproduces (measured: held-out perplexity 16.955 vs 16.959 bf16;
    # 1x64 re-quantizes onto a misaligned grid and measured 21.73, +28%).
    ckpt = smollm2_quantized(4, (1, 32))
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with qahira_server([str(ckpt), "--served-model-name", "smollm2-int4",
                        "--quantization", "qahira", "--kv-cache-memory-bytes", str(KV_CACHE_BYTES),
                        "--max-model-len", "1024", "--enforce-eager"], log) as url:
        yield url, log


@pytest.fixture(scope="module")
def client(int4_server):
    from openai import OpenAI

    return OpenAI(base_url=int4_server[0] + "/v1", api_key="unused")


def test_kernel_in_use_is_measured_per_batch_size(int4_server, client):
    """The INT4 layers go to cpu_measured, which logs its table per shape class, each bucket
    naming one of the fast CPU kernels."""
    client.models.list()
    log = int4_server[1].read_text()
    assert "qahira: using kernel cpu_measured" in log
    assert log.count("kernel per batch size for int4") >= 4  # qkv, o, gate_up, down
    # vLLM's log formatter repeats its prefix on each line of a multi-line message
    chosen = [line.split()[-1] for line in log.splitlines() if " M<=" in line]
    assert len(chosen) >= 4 * len(M_BUCKETS) and set(chosen) <= {
        "cpu_int4", "cpu_int4pack", "cpu_dequant_dense", *(f"cpu_dequant_gemm[{v}]" for v in
                                                           ("avx2", "avx512", "avx512_bf16",
                                                            "amx"))}


def test_chat_answers_coherently(client):
    """A question this 135M model answers right with its exact weights (dequant_torch and
    cpu_blockwise answer "The capital of France is Paris." too; measured). "What is the capital
    of France?" is not one: its greedy answer flips with rounding (cpu_int4 says Paris, the
    exact kernels "L'Étoile, la Marseillaise, ...")."""
    r = client.chat.completions.create(
        model="smollm2-int4", temperature=0, max_tokens=24,
        messages=[{"role": "user", "content": "Name the capital of France."}])
    assert "Paris" in r.choices[0].message.content


def test_completion_answers_coherently(client):
    r = client.completions.create(model="smollm2-int4", prompt="The capital of France is",
                                  temperature=0, max_tokens=8)
    assert "Paris" in r.choices[0].text


def test_int4_perplexity_within_10_percent_of_bf16(client, smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qahira_vllm.models import HELDOUT_TEXT

    r = client.completions.create(model="smollm2-int4", prompt=HELDOUT_TEXT, max_tokens=1,
                                  temperature=0, echo=True, logprobs=0)
    lps = [lp for lp in r.choices[0].logprobs.token_logprobs if lp is not None]
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tok(HELDOUT_TEXT, return_tensors="pt").input_ids
    lps = lps[: ids.shape[1] - 1]  # drop the one generated token's logprob
    assert len(lps) == ids.shape[1] - 1
    ppl_int4 = math.exp(-sum(lps) / len(lps))

    bf16 = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ppl_bf16 = math.exp(bf16(ids, labels=ids).loss.item())
    print(f"held-out perplexity: bf16 {ppl_bf16:.3f}, served INT4 {ppl_int4:.3f}")
    assert ppl_int4 <= 1.10 * ppl_bf16
