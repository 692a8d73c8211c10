// Elementwise ops: residual add, the SwiGLU and GeGLU gates with their backwards, scaling in place,
// rows scaled by the sigmoid of a gate (Qwen2-MoE's shared expert) with its backward.

struct ElementwiseParams {
    n: u32,
    // `scale`'s factor or `soft_cap`'s cap, as bits; `scale_rows`' and `sigmoid_gated_rows`' row width.
    factor_bits: u32,
    // `sigmoid_gated_rows`: 1 adds into out0.
    accumulate: u32,
    // The clamped SwiGLU's limit, as bits (its alpha is `factor_bits`).
    limit_bits: u32,
}

@group(0) @binding(0) var<uniform> p: ElementwiseParams;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out0: array<f32>;
@group(0) @binding(4) var<storage, read_write> out1: array<f32>;
@group(0) @binding(5) var<storage, read> c: array<f32>;


fn sigmoid(v: f32) -> f32 {
    return 1.0 / (1.0 + exp(-v));
}

// out0 = a + b
@compute @workgroup_size(256)
fn add(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = flat_index(id);
    if (i < p.n) {
        out0[i] = a[i] + b[i];
    }
}

// out0 += a
@compute @workgroup_size(256)
fn add_assign(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = flat_index(id);
    if (i < p.n) {
        out0[i] = out0[i] + a[i];
    }
}

// out0 = silu(a) · b  (a = gate, b = up)
@compute @workgroup_size(256)
fn swiglu_forward(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = flat_index(id);
    if (i < p.n) {
        out0[i] = a[i] * sigmoid(a[i]) * b[i];
    }
}

// GELU's tanh approximation in PyTorch's order; the argument of tanh is clamped where tanh(x) is 1 or
// -1 in f32 anyway, as some drivers' tanh gives NaN for large arguments.
const GELU_BETA: f32 = 0.7978845608028654;
const GELU_KAPPA: f32 = 0.044715;

fn gelu_inner(x: f32) -> f32 {
    return clamp(GELU_BETA * (x + GELU_KAPPA * (x * x * x)), -10.0, 10.0);
}

// out0 = gelu_tanh(a) · b  (a = gate, b = up)
@compute @workgroup_size(256)
fn geglu_forward(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = flat_index(id);
    if (i < p.n) {
        let g = a[i];
        out0[i] = 0.5 * g * (1.0 + tanh(gelu_inner(g))) * b[i];
    }
}

// c = dh: out0 = d gate, out1 = d up
@compute @workgroup_size(256)
fn geglu_backward(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = flat_index(id);
    if (i < p.n) {
        let g = a[i];
        let t = tanh(gelu_inner(g));
        let slope = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * GELU_BETA * (1.0 + 3.0 * GELU_KAPPA * g * g);
        out0[i] = c[i] * b[i] * slope;
        out1[i] = c[i] * 0.5 * g * (1.0 + t);
    }
}

// out0 *= factor
@compute @workgroup_size(256)
fn scale(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = flat_index(id);
    if (i < p.n) {
        out0[i] = out0[i] * bitcast<f32>(p.factor_bits);
    }
}

// out0[i] *= a[i / dim], dim = factor_bits (a factor per row)
@compute @workgroup_size(256)
fn scale_rows(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = flat_index(id);
    if (i < p.n) {
        out0[i] = out0[i] * a[i / p.factor_bits];
    }
}

// out0 (+)= σ(a[i / dim]) · b[i], dim = factor_bits (a gate per row)
@compute @workgroup_size(256)
fn sigmoid_gated_rows(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = flat_index(id);
    if (i < p.n) {
        let v = sigmoid(a[i / p.factor_bits]) * b[i];
        if (p.accumulate != 0u) {
            out0[i] = out0[i] + v;
        } else {
            out0[i] = v;
        }
    }
}

var<workgroup> row_dot: array<f32, 256>;

// `sigmoid_gated_rows`' backward, a workgroup per row of `p.n`: a = the gates, b = s, c = dy
// [rows, dim]; out0 = ds = σ(g)·dy, out1 = dg = σ(g)(1 − σ(g))·Σ dy·s.
@compute @workgroup_size(256)
fn sigmoid_gated_rows_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let row = wid.x + wid.y * 65535u;
    if (row >= p.n) {
        return;
    }
    let dim = p.factor_bits;
    let gate = sigmoid(a[row]);
    var dot = 0.0;
    for (var j = lane; j < dim; j += 256u) {
        let i = row * dim + j;
        out0[i] = gate * c[i];
        dot += c[i] * b[i];
    }
    row_dot[lane] = dot;
    workgroupBarrier();
    for (var half = 128u; half > 0u; half >>= 1u) {
        if (lane < half) {
            row_dot[lane] += row_dot[lane + half];
        }
        workgroupBarrier();
    }
    if (lane == 0u) {
        out1[row] = gate * (1.0 - gate) * row_dot[0];
    }
}

// out0 = cap · tanh(out0 / cap), cap = factor (final-logit soft-capping)
@compute @workgroup_size(256)
fn soft_cap(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = flat_index(id);
    if (i < p.n) {
        let cap = bitcast<f32>(p.factor_bits);
        out0[i] = cap * tanh(clamp(out0[i] / cap, -10.0, 10.0));
    }
}

// gpt-oss: out0 = (u + 1)·g·σ(alpha·g), g = min(a, limit), u = b within ±limit.
@compute @workgroup_size(256)
fn clamped_swiglu_forward(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = flat_index(id);
    if (i < p.n) {
        let alpha = bitcast<f32>(p.factor_bits);
        let limit = bitcast<f32>(p.limit_bits);
        let g = min(a[i], limit);
        let u = clamp(b[i], -limit, limit);
        out0[i] = (u + 1.0) * (g * sigmoid(alpha * g));
    }
}

// c = dh: out0 = d gate, out1 = d up; the clamps pass the gradient within their bounds, inclusive.
@compute @workgroup_size(256)
fn clamped_swiglu_backward(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = flat_index(id);
    if (i < p.n) {
        let alpha = bitcast<f32>(p.factor_bits);
        let limit = bitcast<f32>(p.limit_bits);
        let g = min(a[i], limit);
        let u = clamp(b[i], -limit, limit);
        let s = sigmoid(alpha * g);
        var dg = 0.0;
        if (a[i] <= limit) {
            dg = c[i] * (u + 1.0) * s * (1.0 + alpha * g * (1.0 - s));
        }
        var du = 0.0;
        if (abs(b[i]) <= limit) {
            du = c[i] * g * s;
        }
        out0[i] = dg;
        out1[i] = du;
    }
}

// c = dh: out0 = d gate, out1 = d up
@compute @workgroup_size(256)
fn swiglu_backward(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = flat_index(id);
    if (i < p.n) {
        let g = a[i];
        let s = sigmoid(g);
        out0[i] = c[i] * b[i] * s * (1.0 + g * (1.0 - s));
        out1[i] = c[i] * g * s;
    }
}
