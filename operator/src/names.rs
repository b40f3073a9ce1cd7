//! Deterministic object names and label values derived from user-chosen names, kept within
//! Kubernetes' length and character rules (hashed suffix when truncation is needed).

/// Longest DNS-1123 subdomain (object names).
pub const MAX_NAME: usize = 253;
/// Longest label value.
pub const MAX_LABEL_VALUE: usize = 63;

/// 64-bit FNV-1a: stable across releases and platforms, unlike `std`'s hasher.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `text` if it fits in `max`; otherwise a prefix of it, then `-` and a hash of all of it,
/// so that distinct long inputs keep distinct results. The result ends alphanumeric.
pub fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let suffix = format!("{:016x}", fnv1a64(text.as_bytes()));
    let keep = max.saturating_sub(suffix.len() + 1);
    let head: String = text.chars().take(keep).collect();
    let head = head.trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
    if head.is_empty() {
        suffix
    } else {
        format!("{head}-{suffix}")
    }
}

/// A label value naming an object (names may be longer than label values allow).
pub fn label_value(name: &str) -> String {
    bounded(name, MAX_LABEL_VALUE)
}

/// True for a valid DNS-1123 subdomain: lowercase alphanumerics, `-` and `.`, at most 253
/// characters, starting and ending alphanumeric.
pub fn is_dns_subdomain(name: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name.chars().all(|c| alnum(c) || c == '-' || c == '.')
        && name
            .split('.')
            .all(|part| part.starts_with(alnum) && part.ends_with(alnum))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_are_kept_as_they_are() {
        assert_eq!(bounded("web", 63), "web");
    }

    #[test]
    fn long_names_are_cut_and_get_a_hash_of_the_whole() {
        let long = "a".repeat(300);
        let name = bounded(&long, MAX_NAME);
        assert_eq!(name.len(), MAX_NAME);
        assert!(is_dns_subdomain(&name));
        assert_ne!(bounded(&format!("{long}x"), MAX_NAME), name);
    }

    #[test]
    fn a_cut_never_leaves_a_dash_before_the_hash() {
        let text = format!("{}-{}", "a".repeat(45), "b".repeat(40));
        let value = label_value(&text);
        assert!(value.len() <= MAX_LABEL_VALUE);
        assert!(!value.contains("--"));
    }

    #[test]
    fn the_hash_is_stable() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn subdomain_rules_reject_uppercase_and_edge_dashes() {
        assert!(is_dns_subdomain("web-1.example"));
        assert!(!is_dns_subdomain("Web"));
        assert!(!is_dns_subdomain("web-"));
        assert!(!is_dns_subdomain("-web"));
        assert!(!is_dns_subdomain("web..x"));
    }
}
