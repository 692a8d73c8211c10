//! Every WGSL kernel, as the GPU compiles it (common prelude included), parses and validates with naga.

#[test]
fn every_shader_validates_with_naga() {
    assert!(nibble::gpu::SHADERS.len() >= 10);
    for (name, _) in nibble::gpu::SHADERS {
        let source = nibble::gpu::shader_source(name).unwrap();
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
    for (name, _) in nibble::gpu::SHADERS {
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
