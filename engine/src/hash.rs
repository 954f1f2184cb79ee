//! Row fingerprints: the snapshot stores one per delivered key, so a changed hash means the
//! row must be sent again.

/// blake3 of the row's canonical bytes (the extension passes jsonb's canonical text, whose key
/// order is deterministic, so equal rows hash equally).
pub fn row_hash(canonical: &[u8]) -> [u8; 32] {
    *blake3::hash(canonical).as_bytes()
}


/// Fingerprints of version 4 (syncs created since 0.8.0): 24 bytes, a 128-bit identity of the
/// row's key followed by a 64-bit hash of its mapped fields. The planner keeps only these in
/// memory to diff a whole model against the snapshot in one pass (the key identity finds the
/// snapshot row, the field hash says whether it changed); the snapshot keeps them in its
/// `hash` column. Both halves are xxh3 over self-delimiting parts (a tag byte, the length, the
/// bytes), so that ("ab", "c") and ("a", "bc") differ.
pub const FINGERPRINT_LEN: usize = 24;

/// What a part of a fingerprint is. Key parts are the values' text, tagged by their JSON kind,
/// so that a key keeps its identity when its column is widened (int to bigint) as it keeps its
/// jsonb form. Field parts are tagged by the kind of bytes they are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Part {
    Null = b'0',
    KeyNumber = b'n',
    KeyText = b's',
    /// Integers of any width, as 8 little-endian bytes.
    Integer = b'i',
    Bool = b'b',
    Date = b'd',
    Timestamp = b'T',
    TimestampTz = b'Z',
    Float4 = b'f',
    Float8 = b'F',
    Uuid = b'u',
    /// text, varchar, char.
    String = b'S',
    Bytea = b'x',
    /// numeric's varlena body, 16-bit units in little-endian order.
    Numeric = b'N',
    /// jsonb's binary body (little-endian machines only: elsewhere jsonb goes by its text).
    Jsonb = b'j',
    /// The value's output text (every other type).
    Text = b't',
}

/// The bytes one row's fingerprint is computed from, gathered part by part; reused from row
/// to row so that hashing a model allocates nothing per row.
#[derive(Default)]
pub struct FingerprintInput {
    key: Vec<u8>,
    fields: Vec<u8>,
}

fn push_part(buf: &mut Vec<u8>, part: Part, bytes: &[u8]) {
    buf.push(part as u8);
    if part != Part::Null {
        buf.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        buf.extend_from_slice(bytes);
    }
}

impl FingerprintInput {
    pub fn clear(&mut self) {
        self.key.clear();
        self.fields.clear();
    }

    pub fn key(&mut self, part: Part, bytes: &[u8]) {
        push_part(&mut self.key, part, bytes);
    }

    pub fn field(&mut self, part: Part, bytes: &[u8]) {
        push_part(&mut self.fields, part, bytes);
    }

    /// The fingerprint: key identity, then the fields' hash seeded by [`fingerprint_seed`].
    pub fn finish(&self, seed: u64) -> [u8; FINGERPRINT_LEN] {
        let mut out = [0u8; FINGERPRINT_LEN];
        out[..16].copy_from_slice(&xxhash_rust::xxh3::xxh3_128(&self.key).to_le_bytes());
        out[16..].copy_from_slice(&xxhash_rust::xxh3::xxh3_64_with_seed(&self.fields, seed).to_le_bytes());
        out
    }
}

/// The seed of a sync's field hashes: a hash of its field names (a renamed destination field
/// or model column changes every row's hash, so every row is sent under its new name).
pub fn fingerprint_seed(signature: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(signature.as_bytes())
}

/// A fingerprint split into its key identity and field hash; None if it is not one of
/// version 4 (a stored hash of the wrong length).
pub fn split_fingerprint(fingerprint: &[u8]) -> Option<(u128, u64)> {
    if fingerprint.len() != FINGERPRINT_LEN {
        return None;
    }
    let key = u128::from_le_bytes(fingerprint[..16].try_into().ok()?);
    let fields = u64::from_le_bytes(fingerprint[16..].try_into().ok()?);
    Some((key, fields))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fingerprint(key: &[(Part, &[u8])], fields: &[(Part, &[u8])], seed: u64) -> [u8; FINGERPRINT_LEN] {
        let mut input = FingerprintInput::default();
        key.iter().for_each(|(p, b)| input.key(*p, b));
        fields.iter().for_each(|(p, b)| input.field(*p, b));
        input.finish(seed)
    }

    #[test]
    fn fingerprint_parts_are_delimited_and_tagged() {
        let seed = fingerprint_seed("v4:id,name");
        let base = fingerprint(&[(Part::KeyNumber, b"1")], &[(Part::String, b"ab"), (Part::String, b"c")], seed);
        assert_eq!(base, fingerprint(&[(Part::KeyNumber, b"1")], &[(Part::String, b"ab"), (Part::String, b"c")], seed));
        // Moving a byte between fields, or a NULL against an empty string, is a change.
        assert_ne!(base, fingerprint(&[(Part::KeyNumber, b"1")], &[(Part::String, b"a"), (Part::String, b"bc")], seed));
        let null = fingerprint(&[(Part::KeyNumber, b"1")], &[(Part::Null, b""), (Part::String, b"c")], seed);
        let empty = fingerprint(&[(Part::KeyNumber, b"1")], &[(Part::String, b""), (Part::String, b"c")], seed);
        assert_ne!(null, empty);
        // The same bytes of another kind (a string "1" against the number 1) are another key.
        let text_key = fingerprint(&[(Part::KeyText, b"1")], &[(Part::String, b"ab"), (Part::String, b"c")], seed);
        assert_ne!(base[..16], text_key[..16]);
        assert_eq!(base[16..], text_key[16..], "the field hash does not depend on the key");
        // Another signature (a renamed field) changes the field hash, not the key identity.
        let renamed = fingerprint(&[(Part::KeyNumber, b"1")], &[(Part::String, b"ab"), (Part::String, b"c")], fingerprint_seed("v4:id,title"));
        assert_eq!(base[..16], renamed[..16]);
        assert_ne!(base[16..], renamed[16..]);
        let (key, fields) = split_fingerprint(&base).unwrap();
        assert_eq!(key.to_le_bytes(), base[..16]);
        assert_eq!(fields.to_le_bytes(), base[16..]);
        assert_eq!(split_fingerprint(&base[..20]), None);
    }

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
