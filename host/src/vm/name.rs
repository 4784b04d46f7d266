//! VM names: what a person types. `^[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}$`,
//! unique among the host's VMs; generated when omitted.

/// Why a name is refused.
pub fn check(name: &str) -> Result<(), &'static str> {
    let mut chars = name.chars();
    match chars.next() {
        None => return Err("is empty"),
        Some(c) if !c.is_ascii_alphanumeric() => return Err("must start with a letter or a digit"),
        Some(_) => {}
    }
    if name.len() > 63 {
        return Err("is longer than 63 characters");
    }
    if !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
        return Err("may hold only letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

const ADJECTIVES: &[&str] = &[
    "amber", "brisk", "calm", "deft", "eager", "fond", "glad", "hazy", "keen", "lucid", "mild",
    "neat", "quiet", "rapid", "sunny", "tidy", "vivid", "warm",
];
const NOUNS: &[&str] = &[
    "aspen", "birch", "cedar", "delta", "ember", "fjord", "grove", "heron", "inlet", "larch",
    "maple", "otter", "pine", "quail", "raven", "spruce", "tern", "willow",
];

/// A readable random name, `adjective-noun-XXXX`; the caller retries on a
/// clash.
pub fn generate() -> String {
    let mut b = [0u8; 4];
    // A name is not a secret: fall back to the clock if the kernel's
    // random source is unavailable.
    if getrandom::fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        b = t.to_le_bytes();
    }
    let adjective = ADJECTIVES[usize::from(b[0]) % ADJECTIVES.len()];
    let noun = NOUNS[usize::from(b[1]) % NOUNS.len()];
    format!("{adjective}-{noun}-{:02x}{:02x}", b[2], b[3])
}

/// A new VM id: 16 random hex digits (never shown as the only handle:
/// names are).
pub fn new_id() -> std::io::Result<String> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(std::io::Error::other)?;
    Ok(hex::encode(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["a", "web-1", "A.b_c", "0", &"x".repeat(63)] {
            assert_eq!(check(good), Ok(()), "{good}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("-a", "start"),
            (".a", "start"),
            ("a/b", "only"),
            ("a b", "only"),
            ("a\n", "only"),
            ("é", "start"),
            (&"x".repeat(64), "63"),
        ] {
            assert!(check(bad).unwrap_err().contains(why), "{bad:?}");
        }
        for _ in 0..50 {
            let n = generate();
            assert_eq!(check(&n), Ok(()), "{n}");
        }
        let id = new_id().unwrap();
        assert_eq!(id.len(), 16);
        assert_ne!(id, new_id().unwrap());
    }
}
