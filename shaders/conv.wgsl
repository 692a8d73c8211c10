// The FLUX.2 VAE encoder's image ops on activations laid out pixels by channels ([H·W, C], row-major over
// the image), as src/ops/conv.rs computes them on the CPU: a convolution's patches gathered for the
// linear kernel (which multiplies them by the weight), and GroupNorm with an optional SiLU.
//
// GroupNorm's statistics are reduced in two levels so that no invocation loops long (Mesa's llvmpipe ends
// loops past 65,535 iterations): each workgroup sums one chunk of one group, values shifted by the group's
// first value (so that the variance E[d²] − E[d]² of nearly constant groups keeps its digits), and a
// second kernel adds the chunks of each group in order.

struct ImageParams {
    // Convolution: input size and channels, kernel, stride, top and left zero padding (of the enlarged
    // input), output width.
    height: u32,
    width: u32,
    channels: u32,
    kernel: u32,
    stride: u32,
    pad_top: u32,
    pad_left: u32,
    out_width: u32,
    // This tile's first output pixel and its pixel count (convolution); pixels of the image (GroupNorm).
    first: u32,
    pixels: u32,
    groups: u32,
    // GroupNorm: chunks per group and values per chunk, epsilon, SiLU after.
    chunks: u32,
    chunk: u32,
    eps: f32,
    silu: u32,
    // Convolution: the input enlarged this many times, each pixel repeated (nearest neighbour).
    upsample: u32,
}

@group(0) @binding(0) var<uniform> p: ImageParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read> weight: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read_write> stats: array<f32>;

// out [pixels, channels · k · k] = each output pixel's patch in PyTorch's (channel, row, column) order,
// zero where it reaches past the image.
@compute @workgroup_size(256)
fn conv_gather(@builtin(global_invocation_id) id: vec3<u32>) {
    let e = flat_index(id);
    let k = p.kernel;
    let row_len = p.channels * k * k;
    if (e >= p.pixels * row_len) {
        return;
    }
    let i = e / row_len;
    let r = e % row_len;
    let ch = r / (k * k);
    let ky = (r / k) % k;
    let kx = r % k;
    let o = p.first + i;
    let iy = i32((o / p.out_width) * p.stride + ky) - i32(p.pad_top);
    let ix = i32((o % p.out_width) * p.stride + kx) - i32(p.pad_left);
    var value = 0.0;
    let up = p.upsample;
    if (iy >= 0 && ix >= 0 && u32(iy) < p.height * up && u32(ix) < p.width * up) {
        value = x[(u32(iy) / up * p.width + u32(ix) / up) * p.channels + ch];
    }
    out[e] = value;
}

// Value `j` of group g (pixel-major, then the group's channels).
fn group_value(g: u32, j: u32) -> f32 {
    let per = p.channels / p.groups;
    return x[(j / per) * p.channels + g * per + j % per];
}

var<workgroup> part_sum: array<f32, 128>;
var<workgroup> part_squares: array<f32, 128>;

// Workgroup (chunk, group): stats[(g · chunks + chunk) · 2 ..] = Σ d and Σ d² over the chunk's values,
// d = value − the group's first value.
@compute @workgroup_size(128)
fn group_norm_partial(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let chunk = wg.x;
    let g = wg.y;
    let count = p.pixels * (p.channels / p.groups);
    let shift = group_value(g, 0u);
    var s = 0.0;
    var q = 0.0;
    let begin = chunk * p.chunk;
    let end = min(begin + p.chunk, count);
    for (var j = begin + li; j < end; j += 128u) {
        let d = group_value(g, j) - shift;
        s += d;
        q += d * d;
    }
    part_sum[li] = s;
    part_squares[li] = q;
    workgroupBarrier();
    for (var half = 64u; half > 0u; half = half / 2u) {
        if (li < half) {
            part_sum[li] += part_sum[li + half];
            part_squares[li] += part_squares[li + half];
        }
        workgroupBarrier();
    }
    if (li == 0u) {
        let at = (g * p.chunks + chunk) * 2u;
        stats[at] = part_sum[0];
        stats[at + 1u] = part_squares[0];
    }
}

// One thread per group: the chunks' sums in order, then the group's mean and 1/√(variance + eps) at
// stats[(groups · chunks + g) · 2 ..].
@compute @workgroup_size(64)
fn group_norm_finish(@builtin(global_invocation_id) id: vec3<u32>) {
    let g = id.x;
    if (g >= p.groups) {
        return;
    }
    var s = 0.0;
    var q = 0.0;
    for (var c = 0u; c < p.chunks; c++) {
        s += stats[(g * p.chunks + c) * 2u];
        q += stats[(g * p.chunks + c) * 2u + 1u];
    }
    let n = f32(p.pixels * (p.channels / p.groups));
    let mean_shifted = s / n;
    let variance = max(q / n - mean_shifted * mean_shifted, 0.0);
    let at = (p.groups * p.chunks + g) * 2u;
    stats[at] = group_value(g, 0u) + mean_shifted;
    stats[at + 1u] = 1.0 / sqrt(variance + p.eps);
}

// out = (x − mean) · rstd · weight + bias per channel, then SiLU when asked.
@compute @workgroup_size(256)
fn group_norm_apply(@builtin(global_invocation_id) id: vec3<u32>) {
    let e = flat_index(id);
    if (e >= p.pixels * p.channels) {
        return;
    }
    let ch = e % p.channels;
    let g = ch / (p.channels / p.groups);
    let at = (p.groups * p.chunks + g) * 2u;
    var v = (x[e] - stats[at]) * stats[at + 1u] * weight[ch] + bias[ch];
    if (p.silu != 0u) {
        v = v / (1.0 + exp(-v));
    }
    out[e] = v;
}
