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
            times = []
            for _ in range(7):
                t = time.perf_counter()
                x @ w.T
                times.append(time.perf_counter() - t)
            times.sort()
            rates.append(2 * rows * inp * out / times[3] / 1e9)
        print(f"{out:>8} {inp:>8} {rows:>5} | {rates[0]:>7.1f} GF/s {rates[1]:>7.1f} GF/s")
