//! Every WGSL kernel, as the GPU compiles it (common prelude included), parses and validates with naga.

#[test]
fn every_shader_validates_with_naga() {
    assert!(nibble::gpu::SHADERS.len() >= 10);
    for name in nibble::gpu::shader_names() {
        let source = nibble::gpu::shader_source(name)
            .unwrap_or_else(|| panic!("{name}: a variant's change no longer finds its text"));
        let module = naga::front::wgsl::parse_str(&source)
            .unwrap_or_else(|e| panic!("shaders/{name}.wgsl: {}", e.emit_to_string(&source)));
        naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::all(),
        )
        .validate(&module)
        .unwrap_or_else(|e| panic!("shaders/{name}.wgsl: {}", e.emit_to_string(&source)));
    }
}

/// Every entry point stays within WebGPU's default limits, which some devices (and browsers) offer and
/// no more: at most 8 storage buffers, 16 KiB of workgroup memory and 256 invocations per workgroup. A
/// kernel past them would fail to build its pipeline there.
#[test]
fn every_entry_point_fits_webgpu_default_limits() {
    for name in nibble::gpu::shader_names() {
        let source = nibble::gpu::shader_source(name).unwrap();
        let module = naga::front::wgsl::parse_str(&source).unwrap();
        let info = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::all(),
        )
        .validate(&module)
        .unwrap();
        let mut layouter = naga::proc::Layouter::default();
        layouter.update(module.to_ctx()).unwrap();
        for (i, entry) in module.entry_points.iter().enumerate() {
            let uses = info.get_entry_point(i);
            let used = || {
                module
                    .global_variables
                    .iter()
                    .filter(|(handle, _)| !uses[*handle].is_empty())
            };
            let storage = used()
                .filter(|(_, g)| matches!(g.space, naga::AddressSpace::Storage { .. }))
                .count();
            let workgroup_bytes: u32 = used()
                .filter(|(_, g)| g.space == naga::AddressSpace::WorkGroup)
                .map(|(_, g)| layouter[g.ty].size)
                .sum();
            let invocations: u32 = entry.workgroup_size.iter().product();
            let what = format!("shaders/{name}.wgsl {}", entry.name);
            eprintln!(
                "{what}: {storage} storage buffers, {workgroup_bytes} B workgroup memory, {invocations} invocations"
            );
            assert!(storage <= 8, "{what}: {storage} storage buffers");
            assert!(
                workgroup_bytes <= 16384,
                "{what}: {workgroup_bytes} B of workgroup memory"
            );
            assert!(invocations <= 256, "{what}: {invocations} invocations");
        }
    }
}

/// (WGSL member name, offset in the Rust struct, whether it is an f32) of a uniform's fields.
type Fields = Vec<(&'static str, usize, bool)>;

/// The fields of a Rust `#[repr(C)]` uniform struct as its WGSL twin names them:
/// `layout!(Rust { wgsl_name: rust.path as f32|u32, ... })`.
macro_rules! layout {
    ($t:ty { $($name:ident : $($path:ident).+ as $kind:ident),* $(,)? }) => {
        (
            std::mem::size_of::<$t>(),
            vec![$((stringify!($name), std::mem::offset_of!($t, $($path).+), stringify!($kind) == "f32")),*]
                as Fields,
        )
    };
}

/// Every Rust parameter struct a kernel reads as its uniform has the layout of the WGSL struct (naga's
/// layouter): the same size, and each named member at the same offset with the same scalar type. A
/// field added, moved or retyped on one side only would silently feed a kernel garbage.
/// The head widths the host picks a build by (and refuses past) are the ones the attention shader's
/// builds hold.
#[test]
fn attention_head_limit_matches_the_shader() {
    let [narrow, wide] = nibble::ops::attention::GPU_HEAD_DIMS;
    for (module, limit) in [("attention", narrow), ("attention_wide", wide)] {
        let source = nibble::gpu::shader_source(module).unwrap();
        assert!(
            source.contains(&format!("const MAX_HEAD_DIM: u32 = {limit}u;")),
            "{module}'s MAX_HEAD_DIM is not {limit}"
        );
    }
}

#[test]
fn every_uniform_struct_matches_its_wgsl_twin() {
    use nibble::ops::adamw::AdamWKernelParams;
    use nibble::ops::attention::AttentionParams;
    use nibble::ops::cross_entropy::CeParams;
    use nibble::ops::dropout::DropoutParams;
    use nibble::ops::linear::LinearParams;
    use nibble::ops::matmul::MatmulParams;
    use nibble::ops::modulate::ModulateParams;
    use nibble::ops::rmsnorm::RmsNormParams;
    use nibble::ops::rope::RopeParams;
    use nibble::ops::{Dims4, EmbedParams};
    let mut cases: Vec<(&str, &str, (usize, Fields))> = vec![
        (
            "adamw",
            "AdamWParams",
            layout!(AdamWKernelParams {
                lr: step.lr as f32,
                beta1: step.beta1 as f32,
                beta2: step.beta2 as f32,
                eps: step.eps as f32,
                weight_decay: step.weight_decay as f32,
                bias_correction1: step.bias_correction1 as f32,
                bias_correction2_sqrt: step.bias_correction2_sqrt as f32,
                grad_scale: step.grad_scale as f32,
                n: n as u32,
                sums_offset: sums_offset as u32,
                max_norm: max_norm as f32,
            }),
        ),
        (
            "attention",
            "AttentionParams",
            layout!(AttentionParams {
                tokens: tokens as u32,
                heads: heads as u32,
                kv_heads: kv_heads as u32,
                head_dim: head_dim as u32,
                scale: scale as f32,
                pass_begin: pass_begin as u32,
                pass_end: pass_end as u32,
                pass_flags: pass_flags as u32,
                query_offset: query_offset as u32,
                causal: causal as u32,
                padded: padded as u32,
                sinks: sinks as u32,
            }),
        ),
        (
            "cross_entropy",
            "CrossEntropyParams",
            layout!(CeParams {
                positions: positions as u32,
                chunk_start: chunk_start as u32,
                chunk_len: chunk_len as u32,
                block_start: block_start as u32,
                grad_scale: grad_scale as f32,
                softcap: softcap as f32,
                dim: dim as u32,
                fmt: fmt as u32,
                dft: dft as u32,
            }),
        ),
        (
            "dropout",
            "DropoutParams",
            layout!(DropoutParams {
                n: n as u32,
                seed_lo: seed_lo as u32,
                seed_hi: seed_hi as u32,
                stream: stream as u32,
                p: p as f32,
                keep_scale: keep_scale as f32,
            }),
        ),
        (
            "elementwise",
            "ElementwiseParams",
            layout!(Dims4 {
                n: a as u32,
                factor_bits: b as u32,
                accumulate: c as u32,
                limit_bits: d as u32
            }),
        ),
        ("bf16", "Bf16Params", layout!(Dims4 { n: a as u32 })),
        (
            "rows",
            "RowsParams",
            layout!(Dims4 {
                rows: a as u32,
                dim: b as u32
            }),
        ),
        (
            "embed",
            "EmbedParams",
            layout!(EmbedParams {
                tokens: tokens as u32,
                dim: dim as u32,
                fmt: fmt as u32,
                row_start: row_start as u32,
                row_count: row_count as u32,
            }),
        ),
        (
            "linear",
            "LinearParams",
            layout!(LinearParams {
                tokens: tokens as u32,
                rows: rows as u32,
                cols: cols as u32,
                fmt: fmt as u32,
                group_size: group_size as u32,
                has_bias: has_bias as u32,
                accumulate: accumulate as u32,
                row_offset: row_offset as u32,
                out_stride: out_stride as u32,
                weight_row: weight_row as u32,
                y_row: y_row as u32,
                scale: scale as f32,
                experts: experts as u32,
                expert_stride: expert_stride as u32,
                first_expert: first_expert as u32,
                gather_k: gather_k as u32,
            }),
        ),
        (
            "matmul",
            "MatmulParams",
            layout!(MatmulParams {
                m: m as u32,
                n: n as u32,
                k: k as u32,
                a_row_stride: a_row_stride as u32,
                a_col_stride: a_col_stride as u32,
                b_row_stride: b_row_stride as u32,
                b_col_stride: b_col_stride as u32,
                ldc: ldc as u32,
                c_col: c_col as u32,
                accumulate: accumulate as u32,
                alpha: alpha as f32,
                mask_side: mask_side as u32,
                mask_key: mask_key as u32,
                mask_p: mask_p as f32,
                mask_scale: mask_scale as f32,
            }),
        ),
        (
            "rmsnorm",
            "RmsNormParams",
            layout!(RmsNormParams {
                rows: rows as u32,
                dim: dim as u32,
                eps: eps as f32,
                offset: offset as f32,
            }),
        ),
        (
            "rope",
            "RopeParams",
            layout!(RopeParams {
                tokens: tokens as u32,
                heads: heads as u32,
                head_dim: head_dim as u32,
                sign: sign as f32,
                adjacent: adjacent as u32,
                rotated: rotated as u32,
            }),
        ),
        (
            "modulate",
            "ModulateParams",
            layout!(ModulateParams {
                rows: rows as u32,
                dim: dim as u32,
                eps: eps as f32,
                first: first as u32,
                second: second as u32,
                len: len as u32,
                accumulate: accumulate as u32,
                n: n as u32,
            }),
        ),
    ];
    cases.push((
        "token_rows",
        "TokenRowsParams",
        layout!(nibble::ops::token_rows::TokenRowsParams {
            count: count as u32,
            dim: dim as u32,
            rows: rows as u32,
            scale: scale as f32,
            softcap: softcap as f32,
            dft: dft as u32,
        }),
    ));
    cases.push((
        "conv",
        "ImageParams",
        layout!(nibble::ops::conv::ImageParams {
            height: height as u32,
            width: width as u32,
            channels: channels as u32,
            kernel: kernel as u32,
            stride: stride as u32,
            pad_top: pad_top as u32,
            pad_left: pad_left as u32,
            out_width: out_width as u32,
            first: first as u32,
            pixels: pixels as u32,
            groups: groups as u32,
            chunks: chunks as u32,
            chunk: chunk as u32,
            eps: eps as f32,
            silu: silu as u32,
            upsample: upsample as u32,
        }),
    ));
    cases.push((
        "moe",
        "MoeParams",
        layout!(nibble::ops::moe::MoeParams {
            tokens: tokens as u32,
            experts: experts as u32,
            top_k: top_k as u32,
            width: width as u32,
            out: out as u32,
            rank: rank as u32,
            row_offset: row_offset as u32,
            gather: gather as u32,
            scale: scale as f32,
            accumulate: accumulate as u32,
            normalize: normalize as u32,
            weighted: weighted as u32,
        }),
    ));
    let shaders: std::collections::BTreeSet<&str> =
        nibble::gpu::SHADERS.iter().map(|(name, _)| *name).collect();
    let covered: std::collections::BTreeSet<&str> = cases.iter().map(|c| c.0).collect();
    assert_eq!(shaders, covered, "every shader's uniform struct is checked");
    for (shader, wgsl_name, (size, fields)) in cases {
        let source = nibble::gpu::shader_source(shader).unwrap();
        let module = naga::front::wgsl::parse_str(&source).unwrap();
        let mut layouter = naga::proc::Layouter::default();
        layouter.update(module.to_ctx()).unwrap();
        let (handle, ty) = module
            .types
            .iter()
            .find(|(_, t)| t.name.as_deref() == Some(wgsl_name))
            .unwrap_or_else(|| panic!("shaders/{shader}.wgsl has no struct {wgsl_name}"));
        let naga::TypeInner::Struct { members, .. } = &ty.inner else {
            panic!("{wgsl_name} is not a struct");
        };
        let what = format!("shaders/{shader}.wgsl {wgsl_name}");
        assert_eq!(layouter[handle].size as usize, size, "{what}: size");
        let named: Vec<_> = members
            .iter()
            .filter(|m| !m.name.as_deref().unwrap_or("_").starts_with('_'))
            .collect();
        assert_eq!(named.len(), fields.len(), "{what}: named members");
        for (member, (name, offset, float)) in named.iter().zip(&fields) {
            assert_eq!(member.name.as_deref(), Some(*name), "{what}: member order");
            assert_eq!(member.offset as usize, *offset, "{what}.{name}: offset");
            let kind = match module.types[member.ty].inner {
                naga::TypeInner::Scalar(s) => s.kind,
                _ => panic!("{what}.{name}: not a scalar"),
            };
            let expected = if *float {
                naga::ScalarKind::Float
            } else {
                naga::ScalarKind::Uint
            };
            assert_eq!(kind, expected, "{what}.{name}: type");
        }
    }
}
