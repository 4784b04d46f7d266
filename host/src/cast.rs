//! The one integer conversion the type system cannot prove lossless but
//! this crate can: it builds for 64-bit Linux only (it runs KVM guests
//! through cocoon-vmm, an x86_64 crate), where `usize` is 64 bits wide
//! (asserted below, at compile time), so a `u64` always fits. Every other narrowing cast in the
//! crate is a checked conversion or states its own range where it is made.

const _: () = assert!(usize::BITS == u64::BITS);

/// `x` as a `usize`: lossless on the one target this crate builds for.
#[inline]
#[allow(
    clippy::cast_possible_truncation,
    reason = "usize is 64 bits wide here (asserted above)"
)]
pub const fn usize_from(x: u64) -> usize {
    x as usize
}
