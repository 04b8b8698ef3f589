"""Test utilities, importable as `support` (pytest puts tests/ on sys.path: pyproject's
`pythonpath`): the engine runner and lock (engine, vllm_runner), the HTTP server fixture
(server), the tiny-model factory and independent references (tiny), the float references of
engine tests (hf_reference), the Q-BaRA dense reference (qbara_reference) and the linear
kernels' references (linear_reference)."""
