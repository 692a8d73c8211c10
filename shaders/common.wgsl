// Prepended to every nibble shader: weight storage formats and their decoding. Frozen weights are bound
// as array<u32> words whatever their format, so one kernel serves every format.

const FMT_F32: u32 = 0u;
const FMT_BF16: u32 = 1u;
const FMT_F16: u32 = 2u;
const FMT_NF4: u32 = 3u;
const FMT_INT4: u32 = 4u;

// bitsandbytes' NF4 code values.
var<private> NF4_TABLE: array<f32, 16> = array<f32, 16>(
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0);

// Element `index` of a dense tensor stored as f32 words or as two 16-bit values per word (low half first).
fn dense_word_value(word: u32, fmt: u32, index: u32) -> f32 {
    if (fmt == FMT_F32) {
        return bitcast<f32>(word);
    }
    let high = (index & 1u) == 1u;
    if (fmt == FMT_BF16) {
        if (high) {
            return bitcast<f32>(word & 0xffff0000u);
        }
        return bitcast<f32>(word << 16u);
    }
    let pair = unpack2x16float(word);
    if (high) {
        return pair.y;
    }
    return pair.x;
}

// Which word holds element `index` of a dense tensor.
fn dense_word_index(fmt: u32, index: u32) -> u32 {
    if (fmt == FMT_F32) {
        return index;
    }
    return index >> 1u;
}

// The 4-bit code of element `col` within its packed word.
fn nibble(word: u32, col: u32) -> u32 {
    return (word >> (4u * (col & 7u))) & 0xfu;
}

fn dequant(code: u32, fmt: u32, scale: f32, minimum: f32) -> f32 {
    if (fmt == FMT_NF4) {
        return NF4_TABLE[code] * scale;
    }
    return minimum + f32(code) * scale;
}

// Rows reduced by one workgroup of ROW_WG threads (norms): the sum of every thread's `value`, in a
// fixed tree order.
const ROW_WG: u32 = 128u;
var<workgroup> row_partial: array<f32, 128>;

fn row_sum(lid: u32, value: f32) -> f32 {
    row_partial[lid] = value;
    workgroupBarrier();
    for (var s = ROW_WG / 2u; s > 0u; s = s / 2u) {
        if (lid < s) {
            row_partial[lid] += row_partial[lid + s];
        }
        workgroupBarrier();
    }
    let total = row_partial[0];
    workgroupBarrier();
    return total;
}

// The element of a 1-D dispatch of 256-thread workgroups spread over y (gpu::groups_1d).
fn flat_index(id: vec3<u32>) -> u32 {
    return id.x + id.y * 65535u * 256u;
}

// LoRA dropout's hash (Wellons' "lowbias32"; src/ops/dropout.rs `mix`, which this must match bit for bit).
fn dropout_hash(v: u32) -> u32 {
    var x = v;
    x ^= x >> 16u;
    x *= 0x7feb352du;
    x ^= x >> 15u;
    x *= 0x846ca68bu;
    x ^= x >> 16u;
    return x;
}

// Whether element `index` survives dropout with probability `prob` under the mask's key
// (`DropoutParams::mask_key`): its 24-bit uniform draw, exact in f32, is at least `prob`.
fn dropout_keeps(key: u32, prob: f32, index: u32) -> bool {
    return f32(dropout_hash(index ^ key) >> 8u) * (1.0 / 16777216.0) >= prob;
}
