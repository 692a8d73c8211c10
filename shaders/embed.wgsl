// Token embedding lookup from a dense table that may be split into row blocks (a binding holds at most
// `max_storage_buffer_binding_size` bytes): each dispatch handles the tokens whose id falls in its block.

struct EmbedParams {
    tokens: u32,
    dim: u32,
    fmt: u32,
    row_start: u32,
    row_count: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: EmbedParams;
@group(0) @binding(1) var<storage, read> table: array<u32>;
@group(0) @binding(2) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> x: array<f32>;

@compute @workgroup_size(64)
fn embed(@builtin(global_invocation_id) id: vec3<u32>) {
    let c = id.x;
    let t = id.y;
    if (c >= p.dim || t >= p.tokens) {
        return;
    }
    let token = ids[t];
    if (token < p.row_start || token >= p.row_start + p.row_count) {
        return;
    }
    let index = (token - p.row_start) * p.dim + c;
    x[t * p.dim + c] = dense_word_value(table[dense_word_index(p.fmt, index)], p.fmt, index);
}
