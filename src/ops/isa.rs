//! The CPU kernel paths: which vector instruction sets nibble has kernels for, which of them this CPU
//! runs, and the cap a user or a test puts on them.
//!
//! Every kernel with vector code has a portable version, and each faster path must give the same
//! results (bit for bit where the order of operations is the same, within stated tolerances where it
//! is not). `NIBBLE_CPU_FEATURES=portable|avx2|avx2vnni|avx512|avx512bf16|amx|neon|neonbf16` makes the whole process take a
//! lower path than the best one its CPU has, so that every path runs on any machine that can execute it;
//! the kernel tests run each available path explicitly.

use std::sync::OnceLock;

/// The environment variable that caps the kernel path.
pub const ENV: &str = "NIBBLE_CPU_FEATURES";

/// A set of kernels, from the most portable to the fastest; on each architecture the later ones need
/// everything the earlier ones of that architecture need.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CpuPath {
    /// Plain Rust: whatever the compiler makes of it for the target's baseline.
    Portable,
    /// x86-64 with AVX2, FMA and F16C (Intel since Haswell, AMD since Zen).
    Avx2,
    /// AVX2 with AVX-VNNI's 16-bit dot products (Intel Core since Alder Lake, which have no AVX-512):
    /// the integer products of `--precision default` (int16_gemm.rs) at twice the rate of plain AVX2.
    /// The AVX-512 paths do not imply it; they use AVX512-VNNI where the CPU has it.
    Avx2Vnni,
    /// AVX2 and AVX-512 F and BW: the elementwise loops run 16 wide.
    Avx512,
    /// AVX-512 with BF16 dot products: the bf16 products of `--precision default` on AMD's cores (on
    /// Intel's without AMX the default takes VNNI's integers: `X86Model::vnni_integers_beat_bf16`).
    Avx512Bf16,
    /// AVX512-BF16 with AMX's bf16 tiles (Intel Xeon since Sapphire Rapids, on Linux, which lends a
    /// process the tile registers on request): the bf16 products on `tdpbf16ps` (src/ops/amx.rs).
    Amx,
    /// aarch64 Advanced SIMD (every ARMv8-A CPU: Apple M-series, Snapdragon, Graviton).
    Neon,
    /// NEON with BF16 dot products (Apple M2 and later, Snapdragon X, Graviton 3): the bf16 products of
    /// `--precision default`.
    NeonBf16,
}

impl CpuPath {
    pub const ALL: [CpuPath; 8] = [
        CpuPath::Portable,
        CpuPath::Avx2,
        CpuPath::Avx2Vnni,
        CpuPath::Avx512,
        CpuPath::Avx512Bf16,
        CpuPath::Amx,
        CpuPath::Neon,
        CpuPath::NeonBf16,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CpuPath::Portable => "portable",
            CpuPath::Avx2 => "avx2",
            CpuPath::Avx2Vnni => "avx2vnni",
            CpuPath::Avx512 => "avx512",
            CpuPath::Avx512Bf16 => "avx512bf16",
            CpuPath::Amx => "amx",
            CpuPath::Neon => "neon",
            CpuPath::NeonBf16 => "neonbf16",
        }
    }

    pub fn parse(name: &str) -> Option<CpuPath> {
        Self::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(name.trim()))
    }

    /// Ok when this CPU can run the path's kernels, else which feature (or architecture) it lacks.
    pub fn supported(self) -> Result<(), String> {
        match self {
            CpuPath::Portable => Ok(()),
            CpuPath::Avx2
            | CpuPath::Avx2Vnni
            | CpuPath::Avx512
            | CpuPath::Avx512Bf16
            | CpuPath::Amx => x86_lacks(self),
            CpuPath::Neon | CpuPath::NeonBf16 => arm_lacks(self),
        }
    }

    fn is_arm(self) -> bool {
        matches!(self, CpuPath::Neon | CpuPath::NeonBf16)
    }

    /// Whether kernels written for `path` may run on this path (an AVX-512 path also runs the AVX2
    /// kernels, NeonBf16 the NEON ones; paths of other architectures never). Only Avx2Vnni itself runs
    /// the AVX-VNNI kernels: an AVX-512 CPU may lack them (`int16_gemm` asks the CPU there).
    pub fn includes(self, path: CpuPath) -> bool {
        match (self, path) {
            (_, CpuPath::Portable) => true,
            (have, CpuPath::Avx2Vnni) => have == CpuPath::Avx2Vnni,
            (have, want) if have.is_arm() != want.is_arm() => false,
            (have, want) => have >= want,
        }
    }
}

impl std::fmt::Display for CpuPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(target_arch = "x86_64")]
fn x86_lacks(path: CpuPath) -> Result<(), String> {
    let mut needs = vec![
        ("avx2", is_x86_feature_detected!("avx2")),
        ("fma", is_x86_feature_detected!("fma")),
        ("f16c", is_x86_feature_detected!("f16c")),
    ];
    if path == CpuPath::Avx2Vnni {
        needs.push(("avxvnni", is_x86_feature_detected!("avxvnni")));
    }
    if path >= CpuPath::Avx512 {
        needs.push(("avx512f", is_x86_feature_detected!("avx512f")));
        needs.push(("avx512bw", is_x86_feature_detected!("avx512bw")));
    }
    if path >= CpuPath::Avx512Bf16 {
        needs.push(("avx512bf16", is_x86_feature_detected!("avx512bf16")));
    }
    if path >= CpuPath::Amx {
        // CPUID leaf 7's EDX: bit 24 AMX-TILE, bit 22 AMX-BF16. (`is_x86_feature_detected!` does not
        // name them on stable Rust.)
        // SAFETY: CPUID runs on every x86-64 CPU; a CPU without leaf 7 (none with AVX2, which `needs`
        // asks for too) answers with another leaf's bits, never faults. (`__cpuid_count` is a safe
        // function since Rust 1.94 and unsafe before it.)
        #[allow(unused_unsafe)]
        let edx = unsafe { std::arch::x86_64::__cpuid_count(7, 0) }.edx;
        needs.push(("amx-tile", edx & (1 << 24) != 0));
        needs.push(("amx-bf16", edx & (1 << 22) != 0));
    }
    let missing: Vec<&str> = needs
        .into_iter()
        .filter(|(_, has)| !has)
        .map(|(name, _)| name)
        .collect();
    if !missing.is_empty() {
        return Err(format!("this CPU lacks {}", missing.join(", ")));
    }
    if path >= CpuPath::Amx {
        return crate::ops::amx::permission();
    }
    Ok(())
}

#[cfg(not(target_arch = "x86_64"))]
fn x86_lacks(_: CpuPath) -> Result<(), String> {
    Err(format!("not an x86-64 CPU ({})", std::env::consts::ARCH))
}

#[cfg(target_arch = "aarch64")]
fn arm_lacks(path: CpuPath) -> Result<(), String> {
    // Advanced SIMD is part of every aarch64 target Rust supports; BF16 is optional (ARMv8.6-A).
    if path == CpuPath::NeonBf16 && !std::arch::is_aarch64_feature_detected!("bf16") {
        return Err("this CPU lacks bf16".into());
    }
    Ok(())
}

#[cfg(not(target_arch = "aarch64"))]
fn arm_lacks(_: CpuPath) -> Result<(), String> {
    Err(format!("not an aarch64 CPU ({})", std::env::consts::ARCH))
}

/// The fastest path this CPU runs.
pub fn detected() -> CpuPath {
    static DETECTED: OnceLock<CpuPath> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        CpuPath::ALL
            .into_iter()
            .rev()
            .find(|p| p.supported().is_ok())
            .unwrap_or(CpuPath::Portable)
    })
}

/// The path `NIBBLE_CPU_FEATURES` asks for (None when unset), or why it cannot be taken here.
pub fn requested() -> Result<Option<CpuPath>, String> {
    let Some(value) = std::env::var_os(ENV) else {
        return Ok(None);
    };
    let value = value.to_string_lossy();
    let known: Vec<&str> = CpuPath::ALL.iter().map(|p| p.name()).collect();
    let path = CpuPath::parse(&value).ok_or_else(|| {
        format!(
            "{ENV}={value}: unknown CPU path (known: {})",
            known.join(", ")
        )
    })?;
    path.supported()
        .map_err(|why| format!("{ENV}={value}: this machine cannot run it: {why}"))?;
    Ok(Some(path))
}

/// The path the kernels take: the requested one, else the fastest detected. (An unusable request falls
/// back to the detected path here; the command line rejects it with `requested()` before any work.)
pub fn active() -> CpuPath {
    static ACTIVE: OnceLock<CpuPath> = OnceLock::new();
    *ACTIVE.get_or_init(|| requested().ok().flatten().unwrap_or_else(detected))
}

/// Every path, each with Ok when this CPU can run it or the reason it cannot (for tests).
pub fn survey() -> Vec<(CpuPath, Result<(), String>)> {
    CpuPath::ALL
        .into_iter()
        .map(|p| (p, p.supported()))
        .collect()
}

/// Who made an x86 CPU (CPUID leaf 0's vendor string).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum X86Vendor {
    Intel,
    Amd,
    /// Hygon's Dhyana: AMD's Zen licensed (family 0x18).
    Hygon,
    Other,
}

/// An x86 CPU's vendor, family and model, with CPUID leaf 1's extended fields folded in as Linux does
/// (`/proc/cpuinfo`): base family 0xF adds the extended family; base families 6 and above take the
/// extended model as the high nibble (Intel's rule for 6 and 0xF; AMD's parts below 0xF report 0
/// there, and Zhaoxin's family 7 needs it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct X86Model {
    pub vendor: X86Vendor,
    pub family: u32,
    pub model: u32,
}

impl X86Model {
    /// From CPUID leaf 0's vendor string and leaf 1's EAX.
    pub fn from_cpuid(vendor: &[u8; 12], leaf1_eax: u32) -> X86Model {
        let base_family = (leaf1_eax >> 8) & 0xF;
        let family = if base_family == 0xF {
            base_family + ((leaf1_eax >> 20) & 0xFF)
        } else {
            base_family
        };
        let base_model = (leaf1_eax >> 4) & 0xF;
        let model = if base_family >= 6 {
            base_model | (((leaf1_eax >> 16) & 0xF) << 4)
        } else {
            base_model
        };
        let vendor = match vendor {
            b"GenuineIntel" => X86Vendor::Intel,
            b"AuthenticAMD" => X86Vendor::Amd,
            b"HygonGenuine" => X86Vendor::Hygon,
            _ => X86Vendor::Other,
        };
        X86Model {
            vendor,
            family,
            model,
        }
    }

    /// Whether the CPU issues 256-bit 16-bit multiply-adds (`vpmaddwd`) on two pipes, as it issues FMAs,
    /// so that integer pairs multiply twice the values an FMA multiplies in the same time. Intel's
    /// Haswell and Broadwell (one vector integer multiplier, port 0) and AMD's families up to 0x17
    /// (Zen, Zen+, Zen 2: pipe FP0 only; LLVM's Znver2 model, AMD's family 17h optimization guide) and
    /// Hygon's Dhyana do not; Skylake and later Intel cores (ports 0 and 1) and Zen 3 and later (FP0
    /// and FP3) do. Other cores count as two-pipe (not verified for Intel's E-cores, Knights Landing
    /// or Zhaoxin); `--precision f32` or `--precision int16` overrides the choice.
    pub fn pair_madds_on_two_pipes(self) -> bool {
        const HASWELL_BROADWELL: [u32; 8] = [0x3C, 0x3F, 0x45, 0x46, 0x3D, 0x47, 0x4F, 0x56];
        match self.vendor {
            X86Vendor::Intel => !(self.family == 6 && HASWELL_BROADWELL.contains(&self.model)),
            X86Vendor::Amd | X86Vendor::Hygon => self.family >= 0x19,
            X86Vendor::Other => true,
        }
    }

    /// Whether, on a core with both AVX512-BF16 and VNNI, the 16-bit integer products (`vpdpwssd`)
    /// run the recipe faster than the bf16 ones (`vdpbf16ps`). Intel's: on a Sapphire Rapids the
    /// AVX-VNNI integers took 157 s against the bf16 products' 209 s (BENCHMARKS.md, session 24, eight
    /// runs at once on pairs of cores; sessions 14 and 20 on another one: 117.7 s bf16, 97.5-113.1 s
    /// AVX-VNNI). AMD's Zen 4 the other way: bf16 52.8-55.0 s, AVX512-VNNI integers 75.5-85.2 s
    /// (session 24). Intel's Cooper Lake, the other Intel core with AVX512-BF16, is counted with
    /// Sapphire Rapids unmeasured.
    pub fn vnni_integers_beat_bf16(self) -> bool {
        self.vendor == X86Vendor::Intel
    }
}

/// This CPU's vendor, family and model; None on other architectures.
pub fn x86_model() -> Option<X86Model> {
    #[cfg(target_arch = "x86_64")]
    {
        static MODEL: OnceLock<X86Model> = OnceLock::new();
        Some(*MODEL.get_or_init(|| {
            use std::arch::x86_64::__cpuid;
            // SAFETY: leaves 0 and 1 exist on every x86-64 CPU. (`__cpuid` is a safe function since
            // Rust 1.94 and unsafe before it.)
            #[allow(unused_unsafe)]
            let (leaf0, leaf1) = unsafe { (__cpuid(0), __cpuid(1)) };
            let mut vendor = [0u8; 12];
            for (i, register) in [leaf0.ebx, leaf0.edx, leaf0.ecx].into_iter().enumerate() {
                vendor[4 * i..4 * i + 4].copy_from_slice(&register.to_le_bytes());
            }
            X86Model::from_cpuid(&vendor, leaf1.eax)
        }))
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}
