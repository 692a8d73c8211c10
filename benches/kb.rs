fn main() {
    for (m, k, n) in [
        (256, 896, 4864),
        (256, 4864, 896),
        (64, 896, 4864),
        (256, 896, 256),
    ] {
        let (gf, ta, ratio) = nibble::ops::bf16_gemm::kernel_only_gflops(m, k, n);
        println!(
            "m{m} k{k} n{n}: kernel {gf:.1} GF/s, pack A {ta:.5}s, panel pack / gemm time = {ratio:.2}"
        );
    }
}
