// The gradients of trained token rows (ops/token_rows.rs): the embedding's rows summed from the
// gradient at the embeddings, and the output projection's from the cross-entropy's gradient at their
// logits, each logit recomputed from the row (gathered into `rows` by shaders/embed.wgsl) and each
// position's log-sum-exp from its TokenLoss row.

struct TokenRowsParams {
    // Tokens (embedding) or labelled positions (output projection).
    count: u32,
    dim: u32,
    // Trained rows.
    rows: u32,
    // The embedding's factor (Gemma's √hidden), or grad_scale.
    scale: f32,
    // Logit soft cap; 0 for none.
    softcap: f32,
    // 1: each position's gradient weighted by its label's probability (dynamic fine-tuning).
    dft: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: TokenRowsParams;
// The gradient at the embeddings [tokens, dim], or the labelled hidden states [positions, dim].
@group(0) @binding(1) var<storage, read> x: array<f32>;
// Token ids [tokens], or labels [positions].
@group(0) @binding(2) var<storage, read> ids: array<u32>;
// The trained token ids [rows].
@group(0) @binding(3) var<storage, read> token_ids: array<u32>;
// Accumulated into: [rows, dim].
@group(0) @binding(4) var<storage, read_write> d_rows: array<f32>;
// The output projection's trained rows [rows, dim].
@group(0) @binding(5) var<storage, read> rows: array<f32>;
// TokenLoss rows [positions, 4]: loss, log-sum-exp, ...
@group(0) @binding(6) var<storage, read> losses: array<f32>;
// dlogit [positions, rows].
@group(0) @binding(7) var<storage, read_write> dlogits: array<f32>;

// d_rows[j] += scale · Σ x[t] over the tokens t whose id is token_ids[j]; one invocation per (column, row).
@compute @workgroup_size(64)
fn embedding_rows_grad(@builtin(global_invocation_id) id: vec3<u32>) {
    let c = id.x;
    let j = id.y;
    if (c >= p.dim || j >= p.rows) {
        return;
    }
    let wanted = token_ids[j];
    var sum = 0.0;
    for (var t = 0u; t < p.count; t++) {
        if (ids[t] == wanted) {
            sum += x[t * p.dim + c];
        }
    }
    d_rows[j * p.dim + c] += p.scale * sum;
}

// dlogit[q, j] = grad_scale · weight_q · slope(z) · (exp(z − lse_q) − [label_q = token_ids[j]]), z the
// (capped) logit of row j at position q; one invocation per (position, row).
@compute @workgroup_size(64)
fn output_rows_dlogit(@builtin(global_invocation_id) id: vec3<u32>) {
    let q = id.x;
    let j = id.y;
    if (q >= p.count || j >= p.rows) {
        return;
    }
    var logit = 0.0;
    for (var c = 0u; c < p.dim; c++) {
        logit += x[q * p.dim + c] * rows[j * p.dim + c];
    }
    var z = logit;
    var slope = 1.0;
    if (p.softcap > 0.0) {
        z = p.softcap * tanh(clamp(logit / p.softcap, -10.0, 10.0));
        let t = z / p.softcap;
        slope = 1.0 - t * t;
    }
    let loss = losses[q * 4u];
    let lse = losses[q * 4u + 1u];
    var weight = 1.0;
    if (p.dft == 1u) {
        weight = exp(-loss);
    }
    let is_label = select(0.0, 1.0, ids[q] == token_ids[j]);
    dlogits[q * p.rows + j] = p.scale * weight * slope * (exp(z - lse) - is_label);
}

// d_rows[j] += Σ_q dlogit[q, j] · x[q]; one invocation per (column, row).
@compute @workgroup_size(64)
fn output_rows_grad(@builtin(global_invocation_id) id: vec3<u32>) {
    let c = id.x;
    let j = id.y;
    if (c >= p.dim || j >= p.rows) {
        return;
    }
    var sum = 0.0;
    for (var q = 0u; q < p.count; q++) {
        sum += dlogits[q * p.rows + j] * x[q * p.dim + c];
    }
    d_rows[j * p.dim + c] += sum;
}
