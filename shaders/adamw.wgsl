// AdamW (torch.optim.AdamW semantics) and the sum of squares behind global-norm clipping.

struct AdamWParams {
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    bias_correction1: f32,
    bias_correction2_sqrt: f32,
    grad_scale: f32,
    n: u32,
    sums_offset: u32,
    max_norm: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: AdamWParams;
@group(0) @binding(1) var<storage, read_write> param: array<f32>;
@group(0) @binding(2) var<storage, read> grad: array<f32>;
@group(0) @binding(3) var<storage, read_write> m: array<f32>;
@group(0) @binding(4) var<storage, read_write> v: array<f32>;
@group(0) @binding(5) var<storage, read_write> sums: array<f32>;
// [global gradient norm, clipping coefficient], written by grad_clip.
@group(0) @binding(6) var<storage, read_write> clip: array<f32>;

@compute @workgroup_size(256)
fn adamw_step(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x + id.y * 65535u * 256u;
    if (i >= p.n) {
        return;
    }
    let g = grad[i] * p.grad_scale * clip[1];
    var w = param[i] * (1.0 - p.lr * p.weight_decay);
    m[i] = p.beta1 * m[i] + (1.0 - p.beta1) * g;
    v[i] = p.beta2 * v[i] + (1.0 - p.beta2) * g * g;
    let denom = sqrt(v[i]) / p.bias_correction2_sqrt + p.eps;
    param[i] = w - (p.lr / p.bias_correction1) * m[i] / denom;
}

var<workgroup> partial: array<f32, 256>;

// Sums `partial` into partial[0]; every invocation of the workgroup must call it.
fn reduce_partial(lane: u32) {
    workgroupBarrier();
    for (var k = 128u; k > 0u; k = k / 2u) {
        if (lane < k) {
            partial[lane] += partial[lane + k];
        }
        workgroupBarrier();
    }
}

// sums[sums_offset + workgroup] = Σ grad² over that workgroup's 4096 elements.
@compute @workgroup_size(256)
fn sum_squares(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    var s = 0.0;
    let start = wg.x * 256u * 16u;
    for (var j = 0u; j < 16u; j++) {
        let i = start + j * 256u + lid.x;
        if (i < p.n) {
            s += grad[i] * grad[i];
        }
    }
    partial[lid.x] = s;
    reduce_partial(lid.x);
    if (lid.x == 0u) {
        sums[p.sums_offset + wg.x] = partial[0];
    }
}

// The global norm over the first n partial sums and torch's clip coefficient (1 when max_norm ≤ 0).
@compute @workgroup_size(256)
fn grad_clip(@builtin(local_invocation_id) lid: vec3<u32>) {
    var s = 0.0;
    for (var i = lid.x; i < p.n; i += 256u) {
        s += sums[i];
    }
    partial[lid.x] = s;
    reduce_partial(lid.x);
    if (lid.x == 0u) {
        let norm = sqrt(partial[0]);
        clip[0] = norm;
        if (p.max_norm > 0.0) {
            clip[1] = min(1.0, p.max_norm / (norm + 1e-6));
        } else {
            clip[1] = 1.0;
        }
    }
}
