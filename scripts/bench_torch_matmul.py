"""PyTorch's dense GEMM rate at the shapes of benches/cpu_kernels.rs, for side-by-side numbers in
BENCHMARKS.md: y = x @ W.T with x [rows, in], W [out, in], in float32 and bfloat16.

    python scripts/bench_torch_matmul.py
"""
import time

import torch

print("torch", torch.__version__, "threads", torch.get_num_threads())
print(f"{'out':>8} {'in':>8} {'rows':>5} | {'f32':>12} {'bf16':>12}")
for out, inp in [(896, 896), (128, 896), (4864, 896), (896, 4864), (151936, 896)]:
    for rows in (64, 256):
        rates = []
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(rows, inp, dtype=dtype)
            w = torch.randn(out, inp, dtype=dtype)
            x @ w.T
            # The fastest of repeated runs (at least 7, up to 200 or about 0.3 s), as
            # benches/cpu_kernels.rs measures nibble.
            best, started = float("inf"), time.perf_counter()
            for run in range(200):
                t = time.perf_counter()
                x @ w.T
                best = min(best, time.perf_counter() - t)
                if run >= 6 and time.perf_counter() - started > 0.3:
                    break
            rates.append(2 * rows * inp * out / best / 1e9)
        print(f"{out:>8} {inp:>8} {rows:>5} | {rates[0]:>7.1f} GF/s {rates[1]:>7.1f} GF/s")
