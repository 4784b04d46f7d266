//! The test guest (`tests/guest`), embedded: the kernel of the built-in
//! demo VM, so `cocoon-host run` with no image needs no file outside the
//! binary. `host/build.rs` builds it (or takes `COCOON_PREBUILT_GUEST`);
//! its protocol (command line in, report lines out on COM1, console echo,
//! power-off on Ctrl-Alt-Del) is `tests/guest/PROTOCOL.md`.

/// The guest: an ELF for x86_64 with a PVH entry note.
pub static TEST_GUEST: &[u8] = include_bytes!(env!("COCOON_DEMO_KERNEL"));

/// The sha256 of [`TEST_GUEST`], in lower-case hex (computed at build time).
pub fn digest() -> &'static str {
    env!("COCOON_DEMO_KERNEL_SHA256")
}

#[cfg(test)]
mod tests {
    use super::*;
    use cocoon_vmm::arch::regs::EntryMode;
    use cocoon_vmm::boot::{self, BootSpec};
    use sha2::{Digest, Sha256};

    #[test]
    fn the_embedded_guest_is_a_pvh_elf_with_its_digest() {
        assert!(TEST_GUEST.starts_with(b"\x7fELF"));
        assert_eq!(digest(), hex::encode(Sha256::digest(TEST_GUEST)));
        // The VMM's own loader takes it, by its PVH entry note, into guest
        // memory as a boot would.
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("guest");
        std::fs::write(&kernel, TEST_GUEST).unwrap();
        let memory = 32 << 20;
        let mem = cocoon_vmm::memory::create_guest_memory(memory).unwrap();
        let entry = boot::load(
            &mem,
            &BootSpec {
                kernel: &kernel,
                initrd: None,
                cmdline: "cocoon.count=100:1",
                memory_size: memory,
                rsdp_addr: 0,
            },
        )
        .unwrap();
        assert!(
            matches!(entry, EntryMode::Pvh { entry, .. } if (1 << 20..3 << 20).contains(&entry)),
            "{entry:?}"
        );
    }
}
