//! Row fingerprints: the snapshot stores one per delivered key, so a changed hash means the
//! row must be sent again.

/// blake3 of the row's canonical bytes (the extension passes jsonb's canonical text, whose key
/// order is deterministic, so equal rows hash equally).
pub fn row_hash(canonical: &[u8]) -> [u8; 32] {
    *blake3::hash(canonical).as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_blake3_reference_vector() {
        // Official blake3 test vector for the empty input.
        let empty = row_hash(b"");
        assert_eq!(
            blake3::Hash::from(empty).to_hex().as_str(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
    }

    #[test]
    fn distinguishes_rows() {
        assert_eq!(row_hash(br#"{"id": 1}"#), row_hash(br#"{"id": 1}"#));
        assert_ne!(row_hash(br#"{"id": 1}"#), row_hash(br#"{"id": 2}"#));
    }
}
