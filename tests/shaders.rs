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
