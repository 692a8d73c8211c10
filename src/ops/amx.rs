//! Intel AMX tiles for the bf16 products (Xeon since Sapphire Rapids): `tdpbf16ps` multiplies a 16 x 32
//! bf16 tile by a 32 x 16 one into 16 x 16 f32 sums, 8,192 multiply-adds per instruction where
//! `vdpbf16ps` does 32. The operands are bf16_gemm's (bf16 pairs along the inner dimension, products
//! and sums in f32), so the tiles are a faster kernel for the same products, not another precision.
//!
//! Rust has no stable AMX intrinsics; the few instructions are written with `asm!`, which stable Rust
//! assembles. Linux lends a process the tile registers' 8 KiB of state only when asked
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM)`); `permission` asks once.

/// Ok once this process may use the tile registers (asked once, then remembered), else why not.
pub fn permission() -> Result<(), String> {
    static GRANTED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    GRANTED.get_or_init(request_permission).clone()
}

#[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
fn request_permission() -> Result<(), String> {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with ARCH_REQ_XCOMP_PERM reads its two integer arguments and touches no
    // memory of ours; on kernels before 5.16 it fails with EINVAL.
    let status = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    if status == 0 {
        Ok(())
    } else {
        Err(format!(
            "Linux refused the AMX tile state (arch_prctl: {}; kernels before 5.16 lack it)",
            std::io::Error::last_os_error()
        ))
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu")))]
fn request_permission() -> Result<(), String> {
    Err("AMX is used on Linux (glibc) builds only".into())
}

/// Rows and columns of every output block the tiles compute.
pub const BLOCK: usize = 32;
/// Pairs of the inner dimension per tile step (one tile row of 64 bytes).
pub const STEP_PAIRS: usize = 16;

/// Tile registers configured on this thread for `block`, released (back to their initial state, which
/// the kernel's context switches need not save) when dropped. Not Send: the configuration is the
/// thread's.
pub(crate) struct Tiles(std::marker::PhantomData<*const ()>);

/// LDTILECFG's 64-byte operand: palette 1, eight tiles of 16 rows x 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl Tiles {
    /// Configures the tile registers on this thread. The caller must have `permission()`, and no other
    /// `Tiles` may be alive on this thread (its drop would release these tiles under it).
    pub(crate) fn start() -> Tiles {
        assert!(permission().is_ok(), "AMX tiles used without permission");
        let mut config = TileConfig([0; 64]);
        config.0[0] = 1;
        for tile in 0..8 {
            // Bytes per row at 16 + 2·tile (a u16), rows at 48 + tile.
            config.0[16 + 2 * tile] = 64;
            config.0[48 + tile] = 16;
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AMX-TILE and the OS granted its state (`permission`); LDTILECFG reads the
        // 64 bytes of `config`, a valid palette-1 configuration.
        unsafe {
            std::arch::asm!("ldtilecfg [{0}]", in(reg) config.0.as_ptr(), options(nostack, preserves_flags));
        }
        Tiles(std::marker::PhantomData)
    }

    /// c[32 x 32] (+)= a · b for a 32-row left operand and a 32-column right one, over `pairs` pairs
    /// (a multiple of 16) of the inner dimension: a's row r holds its pairs at
    /// a[r·a_stride..][..pairs]; b's pair-row p holds the 32 columns' pairs at b[32·p..][..32]
    /// (bf16_gemm's panels); c is row-major with rows of 32. Each pair is (low half, high half) of a
    /// word, the element at the even index of the inner dimension in the low half.
    pub(crate) fn block(
        &mut self,
        a: &[u32],
        a_stride: usize,
        b: &[u32],
        pairs: usize,
        c: &mut [f32],
        add: bool,
    ) {
        assert!(
            pairs.is_multiple_of(STEP_PAIRS),
            "AMX tiles: pairs in steps of 16"
        );
        assert!(
            pairs == 0 || a.len() >= (BLOCK - 1) * a_stride + pairs,
            "AMX tiles: left operand too short"
        );
        assert!(
            b.len() >= pairs * BLOCK,
            "AMX tiles: right operand too short"
        );
        assert!(c.len() >= BLOCK * BLOCK, "AMX tiles: output too short");
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Tiles::start` configured eight 16 x 64-byte tiles on this thread (a `Tiles` is not
        // Send, so this is that thread); the assertions bound every row each load and store touches:
        // a's rows 0..32 at pairs kp..kp + 16, b's pair-rows kp..kp + 16 (128 bytes apart, 64 of them
        // per tile), c's 32 rows of 128 bytes.
        unsafe {
            let (ap, bp, cp) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
            let a_bytes = a_stride * 4;
            let (b_bytes, c_bytes) = (BLOCK * 4, BLOCK * 4);
            let c_lower = cp.add(16 * BLOCK);
            if add {
                std::arch::asm!(
                    "tileloadd tmm0, [{c} + {s}*1]",
                    "tileloadd tmm1, [{c} + {s}*1 + 64]",
                    "tileloadd tmm2, [{d} + {s}*1]",
                    "tileloadd tmm3, [{d} + {s}*1 + 64]",
                    c = in(reg) cp, d = in(reg) c_lower, s = in(reg) c_bytes,
                    options(nostack, preserves_flags, readonly),
                );
            } else {
                std::arch::asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nomem, nostack, preserves_flags),
                );
            }
            for kp in (0..pairs).step_by(STEP_PAIRS) {
                // tmm4/tmm5: a's rows 0..16 and 16..32; tmm6/tmm7: b's columns 0..16 and 16..32.
                std::arch::asm!(
                    "tileloadd tmm4, [{a} + {sa}*1]",
                    "tileloadd tmm5, [{a16} + {sa}*1]",
                    "tileloadd tmm6, [{b} + {sb}*1]",
                    "tileloadd tmm7, [{b} + {sb}*1 + 64]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a = in(reg) ap.add(kp),
                    a16 = in(reg) ap.add(16 * a_stride + kp),
                    sa = in(reg) a_bytes,
                    b = in(reg) bp.add(kp * BLOCK),
                    sb = in(reg) b_bytes,
                    options(nostack, preserves_flags, readonly),
                );
            }
            std::arch::asm!(
                "tilestored [{c} + {s}*1], tmm0",
                "tilestored [{c} + {s}*1 + 64], tmm1",
                "tilestored [{d} + {s}*1], tmm2",
                "tilestored [{d} + {s}*1 + 64], tmm3",
                c = in(reg) cp, d = in(reg) c_lower, s = in(reg) c_bytes,
                options(nostack, preserves_flags),
            );
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (a, a_stride, b, pairs, c, add);
            unreachable!("AMX is x86-64's")
        }
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: TILERELEASE only returns the tile registers (configured by `start`) to their initial
        // state.
        unsafe {
            std::arch::asm!("tilerelease", options(nomem, nostack, preserves_flags));
        }
    }
}
